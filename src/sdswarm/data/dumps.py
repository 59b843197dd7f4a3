"""Danbooru post records and the shapes they come in, turned into index rows (see COLUMNS).

Dumps: the API's JSON (a list, or one post per line), gallery-dl's per-post JSON, the yearly dumps' JSONL, each
possibly gzipped; and a folder of `{post_id}.{ext}` + `.json` pairs, the shape a gallery-dl download leaves.
Streamed: a dump can be many GB. No SQLite here (data/index.py builds and queries the index).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from sdswarm.data.images import IMAGE_EXTS

COLUMNS = ("post_id", "ext", "md5", "width", "height", "file_size", "rating", "tag_count")  # one row's values
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_MAX_RECORD = 64 << 20  # characters one dump record may span


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
    """Danbooru API / gallery-dl / yearly-dump record -> row values (see COLUMNS); Skip if untrainable."""
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


# --- dump files ------------------------------------------------------------------------------------


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


def dump_rows(dump: Path, skipped: Counter[str]) -> Iterator[tuple]:
    """Rows for the trainable records of a dump file; the others counted in `skipped` by reason."""
    for record in read_dump(Path(dump)):
        try:
            yield row_from_post(record)
        except Skip as why:
            skipped[str(why)] += 1


# --- a folder of pairs ------------------------------------------------------------------------


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



