"""The how-to's data set-up, on 127.0.0.1: a bucket laid out as its danbooru bucket, and its SQLite index."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdswarm.data.demo import make_demo_dataset
from tests.data.conftest import HttpBucket, _handler, _Server

PREFIX = "crowdcloud/opendataset/v1/danbooru"  # the how-to's layout: .../danbooru/{post_id}.{image_ext}


def howto_index(path: Path, post_ids: range, ext: str = "png") -> Path:
    """An index in the how-to's schema: posts(post_id, ext, rating)."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE posts (post_id INTEGER PRIMARY KEY, ext TEXT, rating TEXT)")
    db.executemany("INSERT INTO posts VALUES (?, ?, 'g')", [(i, ext) for i in post_ids])
    db.commit()
    db.close()
    return path


@contextmanager
def howto_bucket(folder: Path, count: int) -> Iterator[tuple[HttpBucket, str, Path]]:
    """(the served bucket, the how-to's image URL template for it, its index db): `count` demo posts."""
    files = make_demo_dataset(folder / "files", count=count)
    bucket = HttpBucket()
    for post_id in range(1, count + 1):
        for ext in ("png", "json"):
            bucket.files[f"{PREFIX}/{post_id}.{ext}"] = (files / f"{post_id}.{ext}").read_bytes()
    server = _Server(("127.0.0.1", 0), _handler(bucket))
    bucket.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield bucket, f"{bucket.url}/{PREFIX}/{{post_id}}.{{image_ext}}", howto_index(folder / "danbooru.db",
                                                                                      range(1, count + 1))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
