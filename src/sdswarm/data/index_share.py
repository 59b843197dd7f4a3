"""The index every peer of a swarm trains on, named by the sha256 of its file: relays serve it, joiners fetch it.

Two peers with different indexes would compute different shard plans and train overlapping posts, so the
hash travels in the swarm's config (`data.index_sha256`) and every peer checks its file against it. A joiner
without its own copy downloads the file from the relay it joined through: over HTTP, resumed with a Range
request after a cut (the partial file survives a restart), checked against the hash, cached by hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from sdswarm.config import ConfigError
from sdswarm.data.bucket import FetchError, checked_get

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

INDEX_PATH = "/api/v1/index"  # a relay serves the index it trains on at INDEX_PATH/<sha256>
DOWNLOAD_ATTEMPTS = 5


class IndexUnavailable(ConfigError):
    """No usable index: missing, not downloadable, or not the swarm's. The message says what to do."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_same_index(sha256: str, swarm_sha256: str | None, where: str) -> None:
    """Refuse an index that is not the swarm's: another file means another shard plan, and overlapping data."""
    if swarm_sha256 is not None and sha256 != swarm_sha256:
        raise IndexUnavailable(
            f"this peer's index {where} has sha256 {sha256}, but the swarm trains on the index with sha256 "
            f"{swarm_sha256}: another index gives another shard plan, and peers would train the same posts. "
            "Use the swarm's index (leave data.index unset and this node downloads it from its relay)")


def index_routes(path: Path, sha256: str) -> list[web.RouteDef]:
    """GET INDEX_PATH/<sha256>: the index file (aiohttp answers Range requests, so downloads resume)."""
    from aiohttp import web

    path = Path(path).resolve()

    async def serve(request: web.Request) -> web.StreamResponse:
        if request.match_info["sha256"] != sha256:
            raise web.HTTPNotFound(text=f"this relay serves the index {sha256}")
        return web.FileResponse(path)

    return [web.get(INDEX_PATH + "/{sha256}", serve)]


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    # peers sharing a cache (one machine, several nodes) must not write the same partial file at once
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_index(base_url: str, sha256: str, cache: Path, *, timeout_s: float = 60.0) -> Path:
    """The index with this sha256: from the cache, else downloaded from the relay at `base_url`."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / f"{sha256}.db"
    url = f"{base_url.rstrip('/')}{INDEX_PATH}/{sha256}"
    with _locked(cache / f".{sha256}.lock"):
        if dest.is_file():
            log.info("the swarm's index %s is cached at %s", sha256[:12], dest)
            return dest
        part = cache / f".{sha256}.db.part"
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                asyncio.run(_download(url, part, timeout_s))
                break
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise IndexUnavailable(f"cannot download the swarm's index from {url}: {exc or type(exc).__name__} "
                                           f"({part.stat().st_size if part.exists() else 0} bytes kept in {part}; "
                                           "run again to resume)") from None
                log.warning("index download from %s cut (%s): resuming", url, exc or type(exc).__name__)
        got = file_sha256(part)
        if got != sha256:
            part.unlink()
            raise IndexUnavailable(f"the index downloaded from {url} has sha256 {got}, not {sha256}: discarded; "
                                   "the relay's index changed, or the transfer was corrupted. Try again")
        os.replace(part, dest)
    log.info("downloaded the swarm's index %s from %s (%.1f MB)", sha256[:12], url, dest.stat().st_size / 1e6)
    return dest


async def _download(url: str, part: Path, timeout_s: float) -> None:
    """Append to `part` from where it ends (Range); start over if the relay sends the whole file."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
    try:  # checked_get refuses a relay's redirect into this node's own network
        async with (aiohttp.ClientSession(timeout=timeout) as session,
                    checked_get(session, url, headers=headers) as response):
            if response.status == 416:  # nothing after what we have: complete (the hash check says if it is right)
                return
            if response.status not in (200, 206):
                raise IndexUnavailable(f"cannot download the swarm's index: {url} answered HTTP {response.status}"
                                       + (" (the relay trains on another index now)" if response.status == 404
                                          else ""))
            if have and response.status == 206:
                log.info("resuming the index download at %.1f MB", have / 1e6)
            with open(part, "ab" if response.status == 206 else "wb") as handle:
                async for block in response.content.iter_chunked(1 << 20):
                    handle.write(block)
    except FetchError as exc:
        raise IndexUnavailable(f"cannot download the swarm's index from {url}: {exc.reason}") from None
