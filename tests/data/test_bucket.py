import asyncio
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sdswarm.data.bucket import Bucket, Fetched, FetchSettings, bucket_routes, download, templates_for
from sdswarm.data.index import Post
from tests.data import files

FAST = FetchSettings(concurrency=4, timeout_s=0.3, max_bytes=1 << 20, retries=2, backoff_s=0.01)


def post(post_id: int, image: bytes | None = None, ext: str = "png") -> Post:
    md5 = hashlib.md5(image).hexdigest() if image is not None else None
    return Post(pos=post_id, post_id=post_id, ext=ext, md5=md5)


def fetch(bucket: Bucket, posts: list[Post]) -> dict[int, Fetched]:
    out: dict[int, Fetched] = {}

    async def handle(fetched: Fetched) -> None:
        out[fetched.post.post_id] = fetched

    asyncio.run(bucket.fetch_many(posts, handle))
    assert len(out) == len(posts)  # every post is answered, success or not
    return out


def serve_pair(http_bucket, post_id: int, image: bytes, ext: str = "png") -> None:
    http_bucket.files[f"{post_id}.{ext}"] = image
    http_bucket.files[f"{post_id}.json"] = json.dumps(files.api_post(post_id, image=image)).encode()


def test_templates() -> None:
    assert templates_for("https://b.example/danbooru/{post_id}.{ext}") == (
        "https://b.example/danbooru/{post_id}.{ext}", ("https://b.example/danbooru/{post_id}.json",))
    assert templates_for("http://mother:8080/bucket/") == (
        "http://mother:8080/bucket/{post_id}.{ext}", ("http://mother:8080/bucket/{post_id}.json",))
    assert templates_for("https://img/{post_id}.{ext}", "https://meta/{post_id}")[1] == ("https://meta/{post_id}",)
    assert templates_for("/data/set") == ("/data/set/{post_id}.{ext}",
                                          ("/data/set/{post_id}.json", "/data/set/{post_id}.{ext}.json"))
    with pytest.raises(ValueError, match="post_id"):
        templates_for("https://x/{id}.{ext}")


def test_http_pairs_come_with_their_md5_checked(http_bucket) -> None:
    good, other = files.solid("PNG"), files.solid("PNG", colour="blue")
    serve_pair(http_bucket, 1, good)
    serve_pair(http_bucket, 2, good)
    got = fetch(Bucket(http_bucket.template(), settings=FAST), [post(1, good), post(2, other), post(3)])
    assert got[1].reason is None and got[1].image == good and json.loads(got[1].meta)["id"] == 1
    assert got[1].nbytes == len(good) + len(http_bucket.files["1.json"])
    assert got[2].reason == "md5 mismatch" and got[2].image is None
    assert got[3].reason == "image missing (404)"


def test_404_is_not_retried_500_is(http_bucket) -> None:
    image = files.solid("PNG")
    for i in (1, 2, 3, 4):
        serve_pair(http_bucket, i, image)
    http_bucket.behave.update({"1.png": "404", "2.json": "404", "3.png": "500", "4.png": "500 once"})
    got = fetch(Bucket(http_bucket.template(), settings=FAST), [post(i, image) for i in (1, 2, 3, 4)])
    assert got[1].reason == "image missing (404)" and http_bucket.hits["1.png"] == 1
    assert got[2].reason == "json missing (404)" and http_bucket.hits["2.json"] == 1
    assert got[3].reason == "image http 500" and http_bucket.hits["3.png"] == 1 + FAST.retries
    assert got[4].reason is None and http_bucket.hits["4.png"] == 2  # a passing hiccup costs nothing


def test_slow_truncated_and_oversized_answers(http_bucket) -> None:
    image = files.noisy_jpeg((64, 64))
    for i in (1, 2, 3):
        serve_pair(http_bucket, i, image, ext="jpg")
    http_bucket.behave.update({"1.jpg": "slow", "2.jpg": "truncated", "3.jpg": "huge"})
    http_bucket.slow_s = 5.0
    start = time.perf_counter()
    got = fetch(Bucket(http_bucket.template(), settings=FAST), [post(i, image, "jpg") for i in (1, 2, 3)])
    assert time.perf_counter() - start < 4  # gave up after 3 x 0.3 s timeouts, not the server's 5 s
    assert got[1].reason == "image timeout" and http_bucket.hits["1.jpg"] == 1 + FAST.retries
    assert got[2].reason == "image truncated" and http_bucket.hits["2.jpg"] == 1 + FAST.retries
    assert got[3].reason == "image too large" and http_bucket.hits["3.jpg"] == 1


def test_size_limit_while_reading(http_bucket) -> None:
    big = os.urandom(300_000)
    serve_pair(http_bucket, 1, big)
    settings = FetchSettings(concurrency=1, timeout_s=1, max_bytes=100_000, retries=0)
    assert fetch(Bucket(http_bucket.template(), settings=settings), [post(1)])[1].reason == "image too large"


def test_concurrency_is_bounded(http_bucket) -> None:
    image = files.solid("PNG")
    for i in range(12):
        serve_pair(http_bucket, i, image)
    http_bucket.delay_s = 0.05
    settings = FetchSettings(concurrency=2, timeout_s=2, retries=0)
    got = fetch(Bucket(http_bucket.template(), settings=settings), [post(i, image) for i in range(12)])
    assert all(f.reason is None for f in got.values())
    assert 2 <= http_bucket.max_in_flight <= 4  # two pairs at a time, both halves of each at once


def test_redirects_stay_on_the_buckets_host_or_go_to_a_public_one(http_bucket) -> None:
    """A bucket a relay named must not send this node into its own network (loopback, LAN, cloud metadata)."""
    image = files.solid("PNG")
    for i in (1, 2):
        serve_pair(http_bucket, i, image)
    http_bucket.files["moved/1.png"] = image
    port = http_bucket.url.rsplit(":", 1)[1]
    http_bucket.behave.update({"1.png": "redirect /moved/1.png", "2.png": f"redirect http://localhost:{port}/2.png"})
    got = fetch(Bucket(http_bucket.template(), settings=FAST), [post(1, image), post(2, image)])
    assert got[1].reason is None and got[1].image == image and http_bucket.hits["moved/1.png"] == 1
    assert got[2].reason.startswith(f"image redirected to http://localhost:{port}/2.png, off the bucket's host")
    assert http_bucket.hits["2.png"] == 1  # refused, not retried, and never fetched from there


def test_unreachable_server_is_a_counted_reason() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    got = fetch(Bucket(f"http://127.0.0.1:{port}/", settings=FAST), [post(1)])
    assert got[1].reason.startswith("image connection error")


def test_folder_bucket(tmp_path: Path) -> None:
    image = files.solid("PNG")
    files.write_pair(tmp_path, 1, image)
    (tmp_path / "2.png").write_bytes(image)
    (tmp_path / "2.png.json").write_text(json.dumps(files.api_post(2)))  # gallery-dl naming
    (tmp_path / "3.png").write_bytes(image)  # no json
    (tmp_path / "4.json").write_text("{}")  # no image
    files.write_pair(tmp_path, 5, os.urandom(2000))
    small = FetchSettings(max_bytes=1000)
    got = fetch(Bucket(str(tmp_path), settings=small), [post(1, image), post(2), post(3), post(4), post(5)])
    assert got[1].reason is None and got[1].image == image
    assert got[2].reason is None and json.loads(got[2].meta)["id"] == 2
    assert got[3].reason == "json missing"
    assert got[4].reason == "image missing"
    assert got[5].reason == "image too large"


# --- the serving side ----------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    folder = tmp_path / "bucket"
    folder.mkdir()
    (folder / "1.png").write_bytes(files.solid("PNG"))
    (folder / "index.db").write_bytes(b"sqlite bytes")
    (folder / ".manifest.json").write_text("{}")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.png").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("do not serve")
    (folder / "link.txt").symlink_to(tmp_path / "secret.txt")
    ready, address = threading.Event(), {}
    loop = asyncio.new_event_loop()

    async def start() -> web.AppRunner:
        app = web.Application()
        app.add_routes(bucket_routes(folder, extra={"other.db": tmp_path / "secret.txt"}))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        address["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        address["runner"] = loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield address["url"], folder
    finally:
        asyncio.run_coroutine_threadsafe(address["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _status(url: str, method: str = "GET") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.request(method, url) as response:
        return response.status, await response.read()


def test_bucket_routes_serve_files_and_nothing_else(served) -> None:
    url, folder = served
    assert asyncio.run(_status(f"{url}/bucket/1.png")) == (200, (folder / "1.png").read_bytes())
    assert asyncio.run(_status(f"{url}/bucket/index.db")) == (200, b"sqlite bytes")
    assert asyncio.run(_status(f"{url}/bucket/1.png", "HEAD"))[0] == 200
    assert asyncio.run(_status(f"{url}/bucket/other.db")) == (200, b"do not serve")  # named on purpose
    for name in ("nope.png", ".manifest.json", "sub", "sub%2Fx.png", "..%2Fsecret.txt", "%2E%2E%2Fsecret.txt",
                 "link.txt", "..", "%00"):
        assert asyncio.run(_status(f"{url}/bucket/{name}"))[0] == 404, name
    assert asyncio.run(_status(f"{url}/bucket/../secret.txt"))[0] == 404


def test_fetch_and_download_from_the_served_bucket(served, tmp_path: Path) -> None:
    url, folder = served
    (folder / "1.json").write_text(json.dumps(files.api_post(1)))
    got = fetch(Bucket(f"{url}/bucket/", settings=FAST), [post(1, (folder / "1.png").read_bytes())])
    assert got[1].reason is None
    assert Bucket(str(folder)).folder == folder and Bucket(f"{url}/bucket/").folder is None
    assert download(f"{url}/bucket/index.db", tmp_path / "copy.db").read_bytes() == b"sqlite bytes"
    with pytest.raises(OSError, match="404"):
        download(f"{url}/bucket/missing.db", tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()
