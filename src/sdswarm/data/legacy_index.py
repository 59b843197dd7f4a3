"""The how-to's SQLite index: a `posts(post_id, ext, rating)` table, converted once into this project's index.

The system the how-to comes from ships its index as such a db. Opening it where an sdswarm index is expected
converts it, once, into a file next to it (`NAME.sdswarm.db`); the conversion records the sha256 of the db it
came from, so a changed db is converted again and an unchanged one is reused.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from sdswarm.data.images import IMAGE_EXTS
from sdswarm.data.index import _write_index

log = logging.getLogger(__name__)

CONVERTED_SUFFIX = ".sdswarm.db"


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def is_legacy(path: Path) -> bool:
    """Whether `path` is an SQLite db in the how-to's shape (posts with post_id and ext, no sdswarm meta)."""
    try:
        db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        return {"post_id", "ext"} <= _columns(db, "posts") and not _columns(db, "meta")
    except sqlite3.DatabaseError:  # not an SQLite file at all
        return False
    finally:
        db.close()


def converted_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).stem + CONVERTED_SUFFIX)


def _rows(path: Path, skipped: Counter[str]) -> Iterator[tuple]:
    db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        rating = "rating" if "rating" in _columns(db, "posts") else "NULL"
        for post_id, ext, rate in db.execute(f"SELECT post_id, ext, {rating} FROM posts"):
            try:
                post_id = int(post_id)
            except (TypeError, ValueError):
                skipped["no post id"] += 1
                continue
            ext = str(ext or "").strip().lstrip(".")
            if ext.lower() not in IMAGE_EXTS:
                skipped[f"file type {ext.lower() or 'unknown'}"] += 1
                continue
            yield (post_id, ext, None, None, None, None, rate or None, None)
    finally:
        db.close()


def open_legacy(path: Path, sha256: str) -> Path:
    """The sdswarm index converted from the how-to's db at `path` (whose sha256 is given): reused when it was
    converted from these very bytes, else (re)built next to it."""
    from sdswarm.data.index import Index

    out = converted_path(path)
    if out.is_file():
        try:
            with Index(out) as existing:
                if existing.meta.get("converted_from") == sha256:
                    return out
        except ValueError:
            pass  # damaged or an older layout: convert again
    log.info("%s is the how-to's index (posts: post_id, ext, rating): converting it once into %s", path, out)
    skipped: Counter[str] = Counter()
    try:
        report = _write_index(out, _rows(path, skipped), skipped, source=Path(path).name,
                              extra_meta={"converted_from": sha256})
    except OSError as exc:
        raise OSError(f"cannot write the converted index {out} next to {path}: {exc.strerror or exc}; "
                      "copy the db to a folder you can write to") from None
    log.info("index %s: %s", out, report)
    return out
