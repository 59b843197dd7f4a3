"""The bucket: where the image + JSON pairs live, and fetching them (no decoding here).

A location is a template with ``{post_id}`` and ``{ext}``: an http(s) URL (the how-to's object-storage bucket,
or the mother node's ``/bucket/``) or a local path. Both halves of a pair are fetched concurrently, with bounded
concurrency, a stall timeout, a size limit, and retries with exponential backoff on timeouts, dropped
connections, truncated bodies and 5xx/429, none on 404. A pair with a missing half comes back with a reason
to count, never an exception. `bucket_routes` is the serving side: the files of one folder over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin

import aiohttp

from sdswarm.atomic import atomic_path
from sdswarm.data.index import Post
from sdswarm.hosts import redirect_allowed

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 4 << 20  # a post's metadata is a few KB
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,200}")  # one file, no dotfiles, no separators


@dataclass(frozen=True)
class FetchSettings:
    concurrency: int = 16  # pairs in flight
    timeout_s: float = 30.0  # connect, and the longest silence while reading
    max_bytes: int = 100 << 20  # per image
    retries: int = 3
    backoff_s: float = 0.5  # first retry after about this long, doubling


@dataclass
class Fetched:
    post: Post
    image: bytes | None = None
    meta: bytes | None = None
    reason: str | None = None  # why the pair is discarded; None when both halves came
    transient: bool = False  # the reason may pass (timeout, 5xx, connection): worth another try some day
    nbytes: int = 0  # bytes transferred for this pair


class FetchError(Exception):
    def __init__(self, reason: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.retry = reason, retry


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def fill(template: str, post: Post) -> str:
    # str.replace, not str.format: a template from someone else's config must not reach into objects
    return template.replace("{post_id}", str(post.post_id)).replace("{ext}", post.ext)


def _standard(template: str) -> str:
    return template.replace("{image_ext}", "{ext}")  # the how-to's spelling


def templates_for(source: str, json_source: str | None = None) -> tuple[str, tuple[str, ...]]:
    """(image template, JSON templates tried in order) for a folder, a base URL or a URL template."""
    source, json_source = _standard(source), json_source and _standard(json_source)
    if "{" in source and "{post_id}" not in source:
        raise ValueError(f"bucket location {source!r}: a template needs {{post_id}} (and {{ext}})")
    if is_url(source):
        image = source if "{post_id}" in source else source.rstrip("/") + "/{post_id}.{ext}"
        jsons = (json_source or image.replace("{ext}", "json"),)
    else:
        folder = Path(source)
        image = str(folder / "{post_id}.{ext}")
        # gallery-dl names the metadata {post_id}.{ext}.json
        jsons = (json_source,) if json_source else (
            str(folder / "{post_id}.json"), str(folder / "{post_id}.{ext}.json"))
    if "{post_id}" not in image or any("{post_id}" not in j for j in jsons):
        raise ValueError(f"bucket location {source!r} / {json_source!r} must contain {{post_id}}")
    return image, jsons


class Bucket:
    def __init__(self, source: str, json_source: str | None = None, settings: FetchSettings | None = None):
        self.image_template, self.json_templates = templates_for(source, json_source)
        self.settings = settings or FetchSettings()
        self.remote = is_url(self.image_template)
        # a folder bucket can be served to other peers as it is (bucket_routes)
        self.folder = None if self.remote else Path(self.image_template).parent

    def __repr__(self) -> str:
        return f"Bucket({self.image_template!r}, {self.json_templates!r})"

    # --- one file -------------------------------------------------------------------------------------

    async def _get(self, session: aiohttp.ClientSession | None, location: str, limit: int) -> bytes:
        if not is_url(location):
            return await asyncio.to_thread(_read_local, location, limit)
        assert session is not None
        s = self.settings
        for attempt in range(s.retries + 1):
            try:
                return await _http_get(session, location, limit)
            except FetchError as error:
                if not error.retry or attempt == s.retries:
                    raise
            await asyncio.sleep(s.backoff_s * 2**attempt * random.uniform(0.5, 1.5))  # jitter: no stampede
        raise AssertionError("unreachable")

    async def _get_json(self, session: aiohttp.ClientSession | None, post: Post) -> bytes:
        missing: FetchError | None = None
        for template in self.json_templates:  # the next name only when this one is not there
            try:
                return await self._get(session, fill(template, post), MAX_JSON_BYTES)
            except FetchError as exc:
                if not exc.reason.startswith("missing"):
                    raise
                missing = missing or exc
        assert missing is not None
        raise missing

    # --- pairs ----------------------------------------------------------------------------------------

    async def fetch_pair(self, session: aiohttp.ClientSession | None, post: Post) -> Fetched:
        image, meta = await asyncio.gather(
            self._get(session, fill(self.image_template, post), self.settings.max_bytes),
            self._get_json(session, post),
            return_exceptions=True,
        )
        out = Fetched(post)
        for half, value in (("image", image), ("json", meta)):
            if isinstance(value, FetchError):
                if out.reason is None:
                    out.reason, out.transient = f"{half} {value.reason}", value.retry
            elif isinstance(value, BaseException):
                raise value
            else:
                out.nbytes += len(value)
        if out.reason:
            return out
        assert isinstance(image, bytes) and isinstance(meta, bytes)
        if post.md5 and await asyncio.to_thread(_md5, image) != post.md5:
            out.reason = "md5 mismatch"
            return out
        out.image, out.meta = image, meta
        return out

    async def fetch_many(self, posts: Sequence[Post], handle: Callable[[Fetched], Awaitable[None]]) -> None:
        """Fetch every post's pair and await `handle` on each (success or not), `concurrency` at a time.
        A pair's slot is held until its handler returns, so fetched bytes waiting to be decoded stay bounded."""
        slots = asyncio.Semaphore(self.settings.concurrency)

        async def one(session: aiohttp.ClientSession | None, post: Post) -> None:
            async with slots:
                try:
                    fetched = await self.fetch_pair(session, post)
                except Exception as exc:  # one odd post (a URL yarl refuses, ...) must not sink the chunk
                    log.warning("post %d: fetch failed: %r", post.post_id, exc)
                    fetched = Fetched(post, reason=f"fetch error ({type(exc).__name__})", transient=True)
                await handle(fetched)

        if not self.remote:
            await asyncio.gather(*(one(None, p) for p in posts))
            return
        t = self.settings.timeout_s
        timeout = aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t)
        connector = aiohttp.TCPConnector(limit=2 * self.settings.concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(one(session, p) for p in posts))


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _read_local(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size > limit:
                raise FetchError("too large")
            return handle.read()
    except FileNotFoundError:
        raise FetchError("missing") from None
    except OSError as exc:
        raise FetchError(f"unreadable ({exc.strerror})") from None


REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5


@contextlib.asynccontextmanager
async def checked_get(session: aiohttp.ClientSession, url: str, **kwargs) -> AsyncIterator[aiohttp.ClientResponse]:
    """session.get that follows a redirect only on the URL's host or to a public one (hosts.redirect_allowed): a
    bucket a relay named must not send this node into its own network. Raises FetchError naming the target."""
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(url, allow_redirects=False, **kwargs) as response:
            if response.status not in REDIRECTS:
                yield response
                return
            target = urljoin(url, response.headers.get("Location", ""))
        if not redirect_allowed(url, target):
            raise FetchError(f"redirected to {target[:200]}, off the bucket's host and not a public one")
        url = target
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


async def _http_get(session: aiohttp.ClientSession, url: str, limit: int) -> bytes:
    try:
        async with checked_get(session, url) as response:
            if response.status in (404, 410):
                raise FetchError(f"missing ({response.status})")
            if response.status != 200:
                raise FetchError(f"http {response.status}", retry=response.status in RETRY_STATUSES)
            if response.content_length is not None and response.content_length > limit:
                raise FetchError("too large")
            body = bytearray()
            async for block in response.content.iter_chunked(1 << 16):
                body += block
                if len(body) > limit:
                    raise FetchError("too large")
            return bytes(body)
    except TimeoutError:
        raise FetchError("timeout", retry=True) from None
    except aiohttp.ClientPayloadError:
        raise FetchError("truncated", retry=True) from None
    except aiohttp.ClientError as exc:
        raise FetchError(f"connection error ({type(exc).__name__})", retry=True) from None


def download(url: str, dest: Path, *, timeout_s: float = 60.0) -> Path:
    """Fetch one file (e.g. an index db) to `dest`, atomically; raises OSError naming the URL on failure."""

    async def run(tmp: Path) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, checked_get(session, url) as response:
            if response.status != 200:
                raise OSError(f"cannot download {url}: HTTP {response.status}")
            with open(tmp, "wb") as handle:
                async for block in response.content.iter_chunked(1 << 20):
                    handle.write(block)

    try:
        with atomic_path(Path(dest)) as tmp:
            asyncio.run(run(tmp))
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise OSError(f"cannot download {url}: {type(exc).__name__} {exc}") from None
    except FetchError as exc:
        raise OSError(f"cannot download {url}: {exc.reason}") from None
    return Path(dest)


def bucket_routes(folder: Path, prefix: str = "/bucket", extra: dict[str, Path] | None = None) -> list[web.RouteDef]:
    """aiohttp routes serving the files of `folder` (not its subfolders, not its dotfiles) at
    ``{prefix}/{name}``: the mother node's bucket, e.g. the demo's images, JSON and index.db. `extra`: more
    files by name (an index kept elsewhere, say); they win over the folder's."""
    from aiohttp import web  # only the serving side needs the server half of aiohttp

    root = Path(folder).resolve()
    named = {name: Path(path).resolve() for name, path in (extra or {}).items()}

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name in named and named[name].is_file():
            return web.FileResponse(named[name])
        if not _SAFE_NAME.fullmatch(name):
            raise web.HTTPNotFound()
        path = (root / name).resolve()  # resolve: a symlink must not lead out of the folder
        if path.parent != root or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    return [web.get(prefix.rstrip("/") + "/{name}", serve)]
