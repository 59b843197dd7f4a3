import hashlib
import json
import logging
import time
from pathlib import Path

import pytest

from sdswarm.config import DataConfig
from sdswarm.data.bucket import Bucket, FetchSettings, bucket_routes
from sdswarm.data.chunks import CaptionSettings, ChunkSource, open_chunks
from sdswarm.data.demo import DEMO_POSTS, make_demo_dataset
from sdswarm.data.index import Index, build_from_dump, build_from_folder
from sdswarm.data.rejects import RejectedPosts
from sdswarm.data.shards import ShardPlan
from sdswarm.data.workdir import WorkDir, list_pairs
from sdswarm.swarm.exchange import DATA_PATH
from sdswarm.web.server import HttpServer
from tests.data import files

FAST = FetchSettings(concurrency=4, timeout_s=0.5, retries=1, backoff_s=0.01)


def bad_and_good_posts() -> tuple[dict[int, tuple[bytes, str, dict]], dict[str, int]]:
    """post id -> (bytes the bucket serves, ext, extra post fields); and the discards they should cause."""
    jpeg = files.noisy_jpeg((48, 32))
    posts = {
        1: (files.solid("PNG", (16, 8)), "png", {}),
        2: (jpeg, "jpg", {}),
        3: (files.solid("WEBP", (8, 16)), "webp", {}),
        4: (files.cmyk_jpeg(), "jpg", {}),
        5: (files.exif_rotated_jpeg(), "jpg", {}),  # stored 40x20, upright 20x40
        6: (files.palette_with_transparency(), "png", {}),
        7: (files.grey16_png(), "png", {}),
        10: (b"definitely not an image", "png", {}),
        11: (jpeg[: len(jpeg) // 2], "jpg", {}),  # the bucket holds a cut file (and its md5)
        12: (files.solid("PNG"), "jpg", {}),  # a PNG named .jpg
        13: (files.solid("PNG"), "png", {"tag_string_general": "", "tag_string_copyright": ""}),  # only meta/artist
        14: (files.animated("PNG"), "png", {}),
        15: (files.png_claiming_size(20000, 20000), "png", {}),
        16: (b"", "png", {}),
        17: (files.solid("PNG"), "png", {"md5": "0" * 32}),  # the metadata expects other bytes
    }
    discards = {"not an image": 1, "truncated": 1, "extension mismatch": 1, "empty caption": 1, "animated": 1,
                "too large": 1, "empty file": 1, "md5 mismatch": 1, "image missing (404)": 1,
                "json missing (404)": 1, "image http 500": 1}
    return posts, discards


GOOD = {1: (16, 8), 2: (48, 32), 3: (8, 16), 4: (16, 16), 5: (20, 40), 6: (16, 8), 7: (8, 8)}


@pytest.fixture
def remote(http_bucket, tmp_path: Path):
    """An HTTP bucket with good and bad pairs, and an index built from their metadata dump."""
    posts, discards = bad_and_good_posts()
    dump = []
    for post_id, (data, ext, extra) in posts.items():
        meta = {**files.api_post(post_id, ext=ext, image=data), **extra}
        dump.append(meta)
        http_bucket.files[f"{post_id}.{ext}"] = data
        http_bucket.files[f"{post_id}.json"] = json.dumps(meta).encode()
    for post_id, (name, how) in {20: ("20.png", "404"), 21: ("21.json", "404"), 22: ("22.png", "500")}.items():
        data = files.solid("PNG")
        dump.append(files.api_post(post_id, image=data))
        http_bucket.files[f"{post_id}.png"] = data
        http_bucket.files[f"{post_id}.json"] = json.dumps(dump[-1]).encode()
        http_bucket.behave[name] = how
    dump += [files.api_post(30, ext="gif"), {"id": 31, "file_ext": "png"}]  # left out of the index
    (tmp_path / "dump.json").write_text(json.dumps(dump))
    report = build_from_dump(tmp_path / "dump.json", tmp_path / "index.db")
    assert report.skipped == {"file type gif": 1, "hidden (no file)": 1}
    return http_bucket, Index(tmp_path / "index.db"), discards


def source(index: Index, bucket: Bucket, workdir: Path, *, per_chunk: int = 1000, shards: int = 1,
           max_bytes: int = 10**9, rejects: RejectedPosts | None = None) -> ChunkSource:
    plan = ShardPlan(seed=0, size=len(index), images_per_chunk=per_chunk, shards=shards)
    return ChunkSource(index=index, bucket=bucket, workdir=WorkDir(workdir, max_bytes, CaptionSettings().key()),
                       plan=plan, slot=0, max_pixels=10_000_000, decode_workers=2, rejects=rejects)


def test_rejected_posts_are_remembered_and_never_fetched_again(remote, tmp_path: Path, caplog) -> None:
    http_bucket, index, discards = remote
    bucket = Bucket(http_bucket.template(), settings=FAST)
    rejects_path = tmp_path / "work.rejected.json"
    chunks = source(index, bucket, tmp_path / "work", rejects=RejectedPosts(rejects_path, "b"))
    bad = {p.post_id for p in index.posts_at(range(len(index)))} - set(GOOD)
    try:
        with caplog.at_level(logging.INFO):
            chunks.pairs(0)
        stats = chunks.stats()
        assert stats.rejected_posts == len(bad) == sum(discards.values())
        assert len(stats.last_rejected) == ChunkSource.LAST_REJECTED and "17: md5 mismatch" in stats.last_rejected
        assert f"rejected posts: {len(bad)} remembered in {rejects_path}" in caplog.text
        hits = http_bucket.hits.copy()
        assert len(chunks.pairs(1)) == len(GOOD)  # the next data epoch draws the same posts again
        assert chunks.stats().skipped_rejected == len(bad)
    finally:
        chunks.close()
    again = source(index, bucket, tmp_path / "work", rejects=RejectedPosts(rejects_path, "b"))  # a restart
    try:
        assert len(again.pairs(2)) == len(GOOD) and again.stats().skipped_rejected == len(bad)
    finally:
        again.close()
    assert http_bucket.hits == hits, "a rejected (or cached) post was fetched again"
    fresh = RejectedPosts(rejects_path, "another bucket")  # other files: other verdicts
    assert len(fresh) == 0


def test_not_json_is_told_from_json_of_an_unknown_shape(http_bucket, tmp_path: Path) -> None:
    image = files.solid("PNG")
    metas = {1: b"<html>rate limited</html>", 2: json.dumps({"posts": []}).encode(),
             3: json.dumps(files.api_post(3, image=image)).encode()}
    dump = [files.api_post(post_id, image=image) for post_id in metas]
    for post_id, meta in metas.items():
        http_bucket.files[f"{post_id}.png"], http_bucket.files[f"{post_id}.json"] = image, meta
    (tmp_path / "dump.json").write_text(json.dumps(dump))
    build_from_dump(tmp_path / "dump.json", tmp_path / "index.db")
    chunks = source(Index(tmp_path / "index.db"), Bucket(http_bucket.template(), settings=FAST), tmp_path / "work")
    try:
        assert len(chunks.pairs(0)) == 1
        assert chunks.stats().discarded == {"json unreadable (not JSON)": 1, "json of an unknown shape": 1}
    finally:
        chunks.close()


def test_a_round_over_http_keeps_the_good_pairs_and_counts_every_bad_one(remote, tmp_path: Path) -> None:
    http_bucket, index, discards = remote
    chunks = source(index, Bucket(http_bucket.template(), settings=FAST), tmp_path / "work")
    try:
        pairs = chunks.pairs(0)
        assert {int(p.image.stem): p.size for p in pairs} == GOOD
        assert [int(p.image.stem) for p in pairs] == [p.post_id for p in index.posts_at(
            ShardPlan(0, len(index), 1000, 1).chunk(0, 0)) if p.post_id in GOOD]  # the chunk's order
        assert all(p.caption == "original, 1girl, solo" for p in pairs)
        stats = chunks.stats()
        assert stats.discarded == discards
        assert (stats.chunks, stats.pairs_ready, stats.pairs_fetched, stats.pairs_cached) == (1, 7, 7, 0)
        assert stats.cache_pairs == 7 and stats.cache_bytes == sum(p.image.stat().st_size for p in pairs)
        assert stats.bytes_fetched > stats.cache_bytes
        assert "7 pairs ready" in stats.summary() and "1 md5 mismatch" in stats.summary()
        assert sorted(int(p.image.stem) for p in list_pairs(tmp_path / "work")) == sorted(GOOD)
    finally:
        chunks.close()

    # a restart finds the pairs in the work dir: nothing good is downloaded again
    hits_before = sum(http_bucket.hits[f"{i}.json"] for i in GOOD)
    again = source(index, Bucket(http_bucket.template(), settings=FAST), tmp_path / "work")
    try:
        assert {int(p.image.stem): p.size for p in again.pairs(0)} == GOOD
        assert (again.stats().pairs_cached, again.stats().pairs_fetched) == (7, 0)
        assert sum(http_bucket.hits[f"{i}.json"] for i in GOOD) == hits_before
    finally:
        again.close()


def demo_like_folder(folder: Path, count: int) -> None:
    for post_id in range(1, count + 1):
        files.write_pair(folder, post_id, files.solid("PNG", (8 + post_id % 3 * 8, 8)), general=f"tag{post_id}")


def test_the_next_round_is_prepared_while_this_one_trains(tmp_path: Path) -> None:
    demo_like_folder(tmp_path / "bucket", 40)
    build_from_folder(tmp_path / "bucket", tmp_path / "index.db")
    chunks = source(Index(tmp_path / "index.db"), Bucket(str(tmp_path / "bucket")), tmp_path / "work", per_chunk=10)
    try:
        first = chunks.pairs(0)
        assert len(first) == 10
        deadline = time.monotonic() + 10
        while chunks.stats().chunks < 2 and time.monotonic() < deadline:  # nobody asked for round 1 yet
            time.sleep(0.01)
        assert chunks.stats().chunks == 2
        waited = chunks.stats().waited_s
        second = chunks.pairs(1)
        assert chunks.stats().waited_s - waited < 0.05  # it was ready
        assert {p.image.stem for p in first}.isdisjoint(p.image.stem for p in second)
        assert len({p.image.stem for r in range(4) for p in chunks.pairs(r)}) == 40  # one pass covers all
    finally:
        chunks.close()


def test_the_cache_stays_bounded_but_keeps_the_rounds_in_use(tmp_path: Path) -> None:
    demo_like_folder(tmp_path / "bucket", 40)
    build_from_folder(tmp_path / "bucket", tmp_path / "index.db")
    one = (tmp_path / "bucket" / "1.png").stat().st_size
    chunks = source(Index(tmp_path / "index.db"), Bucket(str(tmp_path / "bucket")), tmp_path / "work",
                    per_chunk=10, max_bytes=15 * one)
    try:
        for r in range(6):
            pairs = chunks.pairs(r)
            assert all(p.image.is_file() for p in pairs)  # what this round trains is on disk
            assert chunks.stats().cache_pairs <= 20  # this round and the next, over the bound if need be
    finally:
        chunks.close()


def data_config(**values) -> DataConfig:
    return DataConfig(**{"images_per_chunk": 50, "shards": 2, "fetch_timeout": 1, "fetch_retries": 0, **values})


def test_open_chunks_from_a_folder_builds_the_index_once(tmp_path: Path) -> None:
    demo_like_folder(tmp_path / "bucket", 12)
    kwargs = dict(seed=1, peer_id="mother", workdir=tmp_path / "work", index_out=tmp_path / "out" / "index.db",
                  demo_dir=tmp_path / "demo")
    chunks = open_chunks(data_config(source=str(tmp_path / "bucket")), **kwargs)
    try:
        assert len(chunks.index) == 12 and len(chunks.pairs(0)) == 6  # two slots share 12 posts
    finally:
        chunks.close()
    built = (tmp_path / "out" / "index.db").stat().st_mtime_ns
    open_chunks(data_config(source=str(tmp_path / "bucket")), **kwargs).close()
    assert (tmp_path / "out" / "index.db").stat().st_mtime_ns == built
    with pytest.raises(FileNotFoundError, match="data.source"):
        open_chunks(data_config(source=str(tmp_path / "nowhere")), **kwargs)


def test_open_chunks_from_a_url_needs_an_index_and_downloads_it(http_bucket, tmp_path: Path) -> None:
    kwargs = dict(seed=1, peer_id="peer", workdir=tmp_path / "work", index_out=tmp_path / "index.db",
                  demo_dir=tmp_path / "demo")
    with pytest.raises(ValueError, match="data.index is required"):
        open_chunks(data_config(source=http_bucket.url + "/"), **kwargs)
    demo_like_folder(tmp_path / "bucket", 4)
    build_from_folder(tmp_path / "bucket", tmp_path / "b.db")
    http_bucket.files["index.db"] = (tmp_path / "b.db").read_bytes()
    for f in (tmp_path / "bucket").iterdir():
        http_bucket.files[f.name] = f.read_bytes()
    config = data_config(source=http_bucket.url + "/", index=http_bucket.url + "/index.db", shards=1)
    chunks = open_chunks(config, **kwargs)
    try:
        captions = sorted(p.caption for p in chunks.pairs(0))
        assert captions == ["original, tag1", "original, tag2", "original, tag3", "original, tag4"], chunks.stats()
    finally:
        chunks.close()


def test_builtin_demo_is_an_indexed_bucket(tmp_path: Path) -> None:
    kwargs = dict(seed=42, workdir=tmp_path / "work", index_out=tmp_path / "index.db", demo_dir=tmp_path / "demo")
    a = open_chunks(data_config(shards=4, images_per_chunk=1000), peer_id="a", peers=["a", "b"], **kwargs)
    b = open_chunks(data_config(shards=4, images_per_chunk=1000), peer_id="b", peers=["a", "b"],
                    **{**kwargs, "workdir": tmp_path / "work-b"})
    try:
        assert len(a.index) == DEMO_POSTS and (tmp_path / "demo" / "index.db").is_file()
        pa, pb = a.pairs(0), b.pairs(0)
        assert len(pa) == len(pb) == DEMO_POSTS // 4 and {p.image.stem for p in pa}.isdisjoint(p.image.stem for p in pb)
        assert a.stats().discarded == {}
        md5 = json.loads((tmp_path / "demo" / f"{pa[0].image.stem}.json").read_text())["md5"]
        assert hashlib.md5(pa[0].image.read_bytes()).hexdigest() == md5
    finally:
        a.close()
        b.close()


def test_a_swarm_peer_picks_its_slot_before_each_round(tmp_path: Path) -> None:
    kwargs = dict(seed=42, workdir=tmp_path / "work", index_out=tmp_path / "index.db", demo_dir=tmp_path / "demo")
    asked: list[int | None] = []

    def choose(current: int | None) -> int:  # a peer of higher priority shows up on slot 0 after round 0
        asked.append(current)
        return 0 if current is None else 1

    chunks = open_chunks(data_config(shards=4, images_per_chunk=1000), peer_id="a", choose_slot=choose, **kwargs)
    try:
        first, second = {p.image.stem for p in chunks.pairs(0)}, {p.image.stem for p in chunks.pairs(1)}
        assert asked[:2] == [None, 0] and chunks.slot == 1
        planned = [{str(p.post_id) for p in chunks.index.posts_at(chunks.plan.chunk(r, slot))} for r, slot in
                   ((0, 0), (1, 1))]
        assert [first, second] == planned
    finally:
        chunks.close()


def test_a_joiner_fetches_the_demo_over_http_from_its_relay(tmp_path: Path) -> None:
    relay_dir = tmp_path / "relay-demo"
    make_demo_dataset(relay_dir)
    server = HttpServer(bucket_routes(relay_dir, prefix=DATA_PATH), "127.0.0.1", 0)
    port = server.start()
    kwargs = dict(seed=42, workdir=tmp_path / "work", index_out=tmp_path / "index.db", demo_dir=tmp_path / "demo")
    chunks = open_chunks(data_config(shards=4, images_per_chunk=1000), peer_id="joiner",
                         demo_mirror=f"http://127.0.0.1:{port}{DATA_PATH}", **kwargs)
    try:
        assert len(chunks.pairs(0)) == DEMO_POSTS // 4
        stats = chunks.stats()
        assert stats.pairs_fetched == DEMO_POSTS // 4 and stats.bytes_fetched > 0 and stats.discarded == {}
        assert chunks.bucket.remote
    finally:
        chunks.close()
        server.stop()
