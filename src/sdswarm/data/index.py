"""The SQLite index of posts: built from a folder of pairs or a metadata dump, queried lazily.

Rows get dense positions 0..N-1 in post-id order (the same dump gives the same positions on every peer,
whatever its line order); shards address posts by position, so drawing a chunk is a primary-key lookup and
nothing is ever loaded whole. No HTTP and no torch here.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sdswarm.atomic import atomic_path, temp_path
from sdswarm.data.images import IMAGE_EXTS

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_COLUMNS = ("post_id", "ext", "md5", "width", "height", "file_size", "rating", "tag_count")
_BATCH = 50_000  # rows per executemany while building
_QUERY_VARS = 900  # stay under SQLite's oldest host-parameter limit
_MAX_RECORD = 64 << 20  # characters one dump record may span


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


class Skip(ValueError):
    """A record that does not become a row; the message is the counted reason."""


def _int(value: Any) -> int | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return int(value)  # yearly dumps hold numbers as strings
    except (TypeError, ValueError):
        return None


def _tag_count(post: Mapping[str, Any]) -> int | None:
    count = _int(post.get("tag_count"))
    if count is not None:
        return count
    if isinstance(post.get("tag_string"), str):
        return len(post["tag_string"].split())
    return len(post["tags"]) if isinstance(post.get("tags"), list) else None


def row_from_post(post: Any) -> tuple:
    """Danbooru API / gallery-dl / yearly-dump record -> row values (see _COLUMNS); Skip if untrainable."""
    if not isinstance(post, Mapping):
        raise Skip("bad record")
    post_id = _int(post.get("id"))
    if post_id is None or post_id < 0:
        raise Skip("no post id")
    md5 = str(post.get("md5") or "").strip().lower()
    if not md5:  # hidden and banned posts come without md5 and file_url
        raise Skip("hidden (no file)")
    ext = str(post.get("file_ext") or "").strip().lower()
    if ext not in IMAGE_EXTS:
        raise Skip(f"file type {ext or 'unknown'}")
    return (post_id, ext, md5 if _MD5.match(md5) else None, _int(post.get("image_width")),
            _int(post.get("image_height")), _int(post.get("file_size")), post.get("rating") or None,
            _tag_count(post))


# --- reading dumps ------------------------------------------------------------------------------------


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _json_list_items(handle: IO[str], read_size: int = 1 << 16) -> Iterator[Any]:
    """The items of a top-level JSON list, decoded one at a time (a dump can be many GB)."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def fill() -> None:
        nonlocal buf, pos, eof
        more = handle.read(read_size)
        eof = not more
        buf, pos = buf[pos:] + more, 0

    def skip(chars: str) -> str:
        """Move past `chars`, reading on as needed; the next character, or "" at the end of the file."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in chars:
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos : pos + 1]
            fill()

    if skip(" \t\r\n") != "[":
        raise ValueError("a JSON dump must be a list of posts, or one post per line (JSONL)")
    pos += 1
    while True:
        after = skip(" \t\r\n,")
        if after == "":
            raise ValueError("the JSON list is not closed: the dump is truncated")
        if after == "]":
            return
        try:
            item, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof or len(buf) - pos > _MAX_RECORD:  # a post is a few KB: this is broken JSON, not a long one
                raise ValueError(f"bad JSON in the dump near {buf[pos:pos + 60]!r}") from None
            fill()
            continue
        if end == len(buf) and not eof:  # a number cut by the read boundary would decode short
            fill()
            continue
        yield item
        pos = end


def read_dump(path: Path) -> Iterator[Any]:
    """Records of a Danbooru metadata dump: a JSON list, or JSONL (API or yearly-dump objects); .gz too.
    A line that is not JSON yields None (counted as a bad record)."""
    with _open_text(path) as handle:
        head = handle.read(4096)
        handle.seek(0)
        if head.lstrip().startswith("["):
            yield from _json_list_items(handle)
            return
        for line in handle:
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    yield None


# --- reading a folder of pairs ------------------------------------------------------------------------


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def folder_records(folder: Path, skipped: Counter[str]) -> Iterator[tuple]:
    """Rows for the `{post_id}.{ext}` + `{post_id}.json` (or gallery-dl's `{post_id}.{ext}.json`) pairs in a
    folder (not recursive). The md5 is that of the file as it is here, so a copy fetched from this folder is
    checked against it; `ext` keeps the file's own spelling (2.JPG), since the bucket looks it up by name."""
    images: dict[str, list[Path]] = {}
    jsons: set[str] = set()
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.is_file():
            continue  # dotfiles: temp files, macOS resource forks, the demo's manifest
        stem, dot, ext = entry.name.rpartition(".")
        if not dot:
            continue
        if ext.lower() == "json":
            jsons.add(stem)
        elif ext.lower() in IMAGE_EXTS or ext.lower() in {"gif", "mp4", "webm", "zip", "swf", "avif"}:
            images.setdefault(stem, []).append(Path(entry.path))
    claimed: set[str] = set()
    for stem in sorted(images):
        files = images[stem]
        keys = [k for f in files for k in (stem, f.name) if k in jsons]
        claimed.update(keys)
        if not stem.isdigit():
            skipped["name is not a post id"] += len(files)
            continue
        if len(files) > 1:
            skipped["duplicate post id"] += len(files)
            continue
        path = files[0]
        if not keys:
            skipped["no json"] += 1
            continue
        ext = path.suffix[1:]
        if ext.lower() not in IMAGE_EXTS:
            skipped[f"file type {ext.lower()}"] += 1
            continue
        try:
            post = json.loads((folder / f"{keys[0]}.json").read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            post = {}
        post = post if isinstance(post, Mapping) else {}
        yield (int(stem), ext, _file_md5(path), _int(post.get("image_width")), _int(post.get("image_height")),
               path.stat().st_size, post.get("rating") or None, _tag_count(post))
    skipped["no image"] += len(jsons - claimed)


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
        insert = f"INSERT OR IGNORE INTO staging.posts VALUES ({', '.join('?' * len(_COLUMNS))})"
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
            INSERT INTO posts SELECT row_number() OVER (ORDER BY post_id) - 1, {', '.join(_COLUMNS)}
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

    def rows() -> Iterator[tuple]:
        for record in read_dump(Path(dump)):
            try:
                yield row_from_post(record)
            except Skip as why:
                skipped[str(why)] += 1

    return _write_index(out, rows(), skipped, source=str(Path(dump).resolve()))


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
                query = f"SELECT pos, {', '.join(_COLUMNS)} FROM posts WHERE pos IN ({', '.join('?' * len(part))})"
                found.update((row[0], Post(*row)) for row in self._db.execute(query, part))
        missing = [p for p in positions if p not in found]
        if missing:
            raise IndexError(f"positions {missing[:5]} are not in {self.path} ({self.size} rows)")
        return [found[p] for p in positions]

    def post(self, post_id: int) -> Post | None:
        with self._lock:
            row = self._db.execute(f"SELECT pos, {', '.join(_COLUMNS)} FROM posts WHERE post_id = ?",
                                   (post_id,)).fetchone()
        return Post(*row) if row else None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- command line: sdswarm index build ----------------------------------------------------------------


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `sdswarm index build`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", type=Path, metavar="DIR", help="a folder of {post_id}.{ext} + .json pairs")
    source.add_argument("--from-dump", type=Path, metavar="FILE",
                        help="a Danbooru metadata dump: JSON list or JSONL, API or yearly-dump shape (.gz ok)")
    parser.add_argument("--out", type=Path, required=True, metavar="INDEX_DB", help="the index file to write")


def build_index_cli(args: argparse.Namespace) -> int:
    """Run `sdswarm index build`; prints what was indexed and skipped. Returns the exit code."""
    start = time.perf_counter()
    try:
        if args.from_folder is not None:
            report = build_from_folder(args.from_folder, args.out)
        else:
            report = build_from_dump(args.from_dump, args.out)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"{args.out}: {report} ({time.perf_counter() - start:.1f} s)")
    return 0
