"""The how-to's index db is read as it is; a joiner downloads the swarm's index from its relay, by hash."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from pathlib import Path

import pytest

from sdswarm.config import DataConfig
from sdswarm.data.chunks import resolve_index
from sdswarm.data.index import Index
from sdswarm.data.index_share import IndexUnavailable, fetch_index, file_sha256, index_routes
from sdswarm.data.legacy_index import converted_path, is_legacy
from sdswarm.web.server import HttpServer


def howto_db(path: Path, posts: list[tuple]) -> Path:
    """An SQLite db in the shape the how-to's system ships: posts(post_id, ext, rating)."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE posts (post_id INTEGER, ext TEXT, rating TEXT)")
    db.executemany("INSERT INTO posts VALUES (?, ?, ?)", posts)
    db.commit()
    db.close()
    return path


HOWTO_POSTS = [(30, "png", "s"), (10, "jpg", "g"), (20, ".webp", "q"), (40, "gif", "g"), (50, "mp4", "e")]


def test_the_howtos_db_is_converted_once_next_to_it(tmp_path: Path, caplog) -> None:
    db = howto_db(tmp_path / "danbooru.db", HOWTO_POSTS)
    assert is_legacy(db)
    data = DataConfig(source="https://bucket.example/danbooru/{post_id}.{image_ext}", index=str(db))
    with caplog.at_level(logging.INFO):
        shared = resolve_index(data, out=tmp_path / "out.db", demo_dir=tmp_path / "demo", cache=tmp_path / "c")
    assert shared.file == db and shared.path == converted_path(db) and shared.sha256 == file_sha256(db)
    assert "is the how-to's index (posts: post_id, ext, rating): converting it once" in caplog.text
    with Index(shared.path) as index:
        assert [(p.post_id, p.ext, p.rating) for p in index.posts_at(range(len(index)))] == [
            (10, "jpg", "g"), (20, "webp", "q"), (30, "png", "s")]
        assert index.meta["skipped"] == {"file type gif": 1, "file type mp4": 1}
    converted = shared.path.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = resolve_index(data, out=tmp_path / "out.db", demo_dir=tmp_path / "demo", cache=tmp_path / "c")
    assert again == shared and shared.path.stat().st_mtime_ns == converted and "converting" not in caplog.text
    assert not is_legacy(shared.path)


def test_a_missing_index_says_where_to_put_the_db_or_how_to_build_one(tmp_path: Path) -> None:
    data = DataConfig(source="https://bucket.example/{post_id}.{ext}", index=str(tmp_path / "danbooru.db"))
    with pytest.raises(IndexUnavailable) as caught:
        resolve_index(data, out=tmp_path / "o.db", demo_dir=tmp_path / "d", cache=tmp_path / "c")
    message = str(caught.value)
    assert "danbooru.db" in message and "the how-to's SQLite db" in message
    assert "sdswarm index build --from-dump" in message


def test_an_index_that_is_not_the_swarms_is_refused_naming_both_hashes(tmp_path: Path) -> None:
    db = howto_db(tmp_path / "mine.db", HOWTO_POSTS[:2])
    swarm = "ab" * 32
    data = DataConfig(source="https://bucket.example/{post_id}.{ext}", index=str(db), index_sha256=swarm)
    with pytest.raises(IndexUnavailable) as caught:
        resolve_index(data, out=tmp_path / "o.db", demo_dir=tmp_path / "d", cache=tmp_path / "c")
    assert file_sha256(db) in str(caught.value) and swarm in str(caught.value)


@pytest.fixture
def relay_serving(tmp_path: Path):
    """A relay's index route on 127.0.0.1, serving a how-to db."""
    (tmp_path / "relay").mkdir()
    db = howto_db(tmp_path / "relay" / "danbooru.db", HOWTO_POSTS)
    sha = file_sha256(db)
    server = HttpServer(index_routes(db, sha), "127.0.0.1", 0)
    port = server.start()
    yield f"http://127.0.0.1:{port}", db, sha
    server.stop()


def test_a_joiner_downloads_the_index_from_its_relay_and_caches_it(tmp_path: Path, relay_serving) -> None:
    url, db, sha = relay_serving
    data = DataConfig(source="https://bucket.example/{post_id}.{ext}", index_sha256=sha)
    shared = resolve_index(data, out=tmp_path / "o.db", demo_dir=tmp_path / "d", cache=tmp_path / "cache", relay=url)
    assert shared.file == tmp_path / "cache" / f"{sha}.db" and shared.file.read_bytes() == db.read_bytes()
    with Index(shared.path) as index:
        assert len(index) == 3
    db.unlink()  # the relay's copy is gone: the cached one is enough
    assert fetch_index(url, sha, tmp_path / "cache") == shared.file
    with pytest.raises(IndexUnavailable, match="HTTP 404"):  # the relay does not serve another hash
        fetch_index(url, "cd" * 32, tmp_path / "cache")


def test_a_cut_download_resumes_where_it_stopped_and_a_corrupt_one_is_discarded(tmp_path: Path, relay_serving,
                                                                                 caplog) -> None:
    url, db, sha = relay_serving
    body = db.read_bytes()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f".{sha}.db.part").write_bytes(body[:1000])  # what a cut transfer left
    with caplog.at_level(logging.INFO):
        assert fetch_index(url, sha, cache).read_bytes() == body
    assert "resuming the index download at" in caplog.text  # a Range request, answered 206
    (cache / f"{sha}.db").unlink()
    (cache / f".{sha}.db.part").write_bytes(b"x" * 1000)  # a bad prefix: the hash check catches it
    with pytest.raises(IndexUnavailable, match=f"not {sha}: discarded"):
        fetch_index(url, sha, cache)
    assert not (cache / f".{sha}.db.part").exists()
    assert fetch_index(url, sha, cache).read_bytes() == body  # and the next try starts over
    assert hashlib.sha256(body).hexdigest() == sha
