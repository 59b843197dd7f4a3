"""The SQLite index of posts: built from a folder of pairs or a metadata dump (their rows: data/dumps.py),
queried lazily.

Rows get dense positions 0..N-1 in post-id order (the same dump gives the same positions on every peer,
whatever its line order); shards address posts by position, so drawing a chunk is a primary-key lookup and
nothing is ever loaded whole. No HTTP and no torch here.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdswarm.atomic import atomic_path, temp_path
from sdswarm.data.dumps import COLUMNS, dump_rows, folder_records

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_BATCH = 50_000  # rows per executemany while building
_QUERY_VARS = 900  # stay under SQLite's oldest host-parameter limit


@dataclass(frozen=True)
class Post:
    pos: int
    post_id: int
    ext: str
    md5: str | None = None
    width: int | None = None
    height: int | None = None
    file_size: int | None = None
    rating: str | None = None
    tag_count: int | None = None


@dataclass
class BuildReport:
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def __str__(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in self.skipped.items()) or "none"
        return f"{self.rows} posts indexed; skipped: {skipped}"


# --- building -----------------------------------------------------------------------------------------


def _write_index(out: Path, rows: Iterable[tuple], skipped: Counter[str], source: str) -> BuildReport:
    """Rows (any order, duplicates allowed) -> `out`, atomically: a crash leaves the old index or none."""
    # peers sharing a cache may build the same index at once: each writes its own temp files, the last rename wins
    with atomic_path(Path(out)) as tmp:
        staging = temp_path(Path(out))
        try:
            return _fill_index(tmp, staging, rows, skipped, source)
        finally:
            staging.unlink(missing_ok=True)


def _fill_index(tmp: Path, staging: Path, rows: Iterable[tuple], skipped: Counter[str], source: str) -> BuildReport:
    db = sqlite3.connect(tmp)
    try:
        db.executescript(f"""
            PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
            ATTACH DATABASE '{staging}' AS staging;
            PRAGMA staging.journal_mode = OFF; PRAGMA staging.synchronous = OFF;
            CREATE TABLE staging.posts (post_id INTEGER PRIMARY KEY, ext TEXT NOT NULL, md5 TEXT, width INTEGER,
                height INTEGER, file_size INTEGER, rating TEXT, tag_count INTEGER);
        """)
        attempted = inserted = 0
        insert = f"INSERT OR IGNORE INTO staging.posts VALUES ({', '.join('?' * len(COLUMNS))})"
        batch: list[tuple] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= _BATCH:
                inserted += db.executemany(insert, batch).rowcount
                attempted, batch = attempted + len(batch), []
        inserted += db.executemany(insert, batch).rowcount
        attempted += len(batch)
        if attempted > inserted:
            skipped["duplicate post id"] += attempted - inserted
        db.executescript(f"""
            CREATE TABLE posts (pos INTEGER PRIMARY KEY, post_id INTEGER NOT NULL, ext TEXT NOT NULL, md5 TEXT,
                width INTEGER, height INTEGER, file_size INTEGER, rating TEXT, tag_count INTEGER);
            INSERT INTO posts SELECT row_number() OVER (ORDER BY post_id) - 1, {', '.join(COLUMNS)}
                FROM staging.posts ORDER BY post_id;
            CREATE UNIQUE INDEX posts_post_id ON posts (post_id);
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """)
        report = BuildReport(rows=inserted, skipped=dict(sorted(skipped.items())))
        meta = {"version": SCHEMA_VERSION, "rows": inserted, "skipped": report.skipped, "source": source,
                "built": time.time()}
        db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        db.commit()
        db.execute("DETACH DATABASE staging")
    finally:
        db.close()
    return report


def build_from_folder(folder: Path, out: Path) -> BuildReport:
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of image + JSON pairs")
    skipped: Counter[str] = Counter()
    return _write_index(out, folder_records(folder, skipped), skipped, source=str(folder.resolve()))


def build_from_dump(dump: Path, out: Path) -> BuildReport:
    skipped: Counter[str] = Counter()
    return _write_index(out, dump_rows(Path(dump), skipped), skipped, source=str(Path(dump).resolve()))


# --- querying -----------------------------------------------------------------------------------------


class Index:
    """A read-only view of an index file; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"index {self.path} does not exist (build it with: sdswarm index build)")
        self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        try:
            self.meta = {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise ValueError(f"{self.path} is not an sdswarm index: {exc}") from None
        if self.meta.get("version") != SCHEMA_VERSION:
            self._db.close()
            raise ValueError(f"{self.path}: index version {self.meta.get('version')}, expected {SCHEMA_VERSION}")
        self.size: int = self.meta["rows"]

    def __len__(self) -> int:
        return self.size

    def posts_at(self, positions: Sequence[int]) -> list[Post]:
        """The posts at these positions, in the same order."""
        found: dict[int, Post] = {}
        positions = [int(p) for p in positions]
        with self._lock:
            for start in range(0, len(positions), _QUERY_VARS):
                part = positions[start : start + _QUERY_VARS]
                query = f"SELECT pos, {', '.join(COLUMNS)} FROM posts WHERE pos IN ({', '.join('?' * len(part))})"
                found.update((row[0], Post(*row)) for row in self._db.execute(query, part))
        missing = [p for p in positions if p not in found]
        if missing:
            raise IndexError(f"positions {missing[:5]} are not in {self.path} ({self.size} rows)")
        return [found[p] for p in positions]

    def post(self, post_id: int) -> Post | None:
        with self._lock:
            row = self._db.execute(f"SELECT pos, {', '.join(COLUMNS)} FROM posts WHERE post_id = ?",
                                   (post_id,)).fetchone()
        return Post(*row) if row else None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
