"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Everything is written under a temp name beside its destination (the same filesystem, so the rename is
atomic) and renamed into place. The one temp name, ``.<name>.<pid>-<random>.tmp``: hidden, never mistaken
for an image, caption or checkpoint, and apart per writer (peers sharing a cache, or threads, may write the
same file at once); the pid tells whether its writer is still alive.
`durable` also survives a power cut: the contents are fsynced before the rename and the folder after it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

# groups: the destination's name, the writer's pid (``.<name>.<pid>.tmp``, before the random part, also matches)
TEMP_NAME = re.compile(r"^\.(.+)\.(\d+)(?:-[0-9a-f]{8})?\.tmp$")


def temp_path(dest: Path) -> Path:
    """A fresh temp name beside `dest`."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_path(dest: Path, *, durable: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `dest` to write a file or build a folder at; when the block ends without
    an error it is renamed to `dest`, otherwise removed. A folder at `dest` is replaced as a whole;
    `replace=False` keeps whatever another writer put at `dest` first."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        yield tmp
        if durable:
            _fsync_tree(tmp)
        _publish(tmp, dest, replace=replace)
        if durable:
            _fsync_dir(dest.parent)
    finally:
        _remove(tmp)


def write_atomic(dest: Path, data: bytes, *, durable: bool = False, mode: int = 0o666) -> Path:
    """Write `data` to `dest` atomically; `mode` (before the umask) holds from the first byte on."""
    with atomic_path(dest, durable=durable) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    return Path(dest)


def _publish(tmp: Path, dest: Path, *, replace: bool) -> None:
    if tmp.is_dir() and dest.is_dir():
        if replace:
            # a rename cannot replace a non-empty folder: move the old one aside first
            old = temp_path(dest)
            os.rename(dest, old)
            os.rename(tmp, dest)
            _remove(old)
        return  # replace=False: another writer's folder is in place, keep it
    try:
        os.replace(tmp, dest)  # a file replaces a file in one step
    except OSError:
        if replace or not dest.exists():
            raise  # else another writer's folder landed between the check and the rename: keep it


def _fsync_tree(path: Path) -> None:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
