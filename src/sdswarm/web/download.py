"""Checkpoint zips streamed as they are built: nothing is written to disk, memory stays at a piece or two.

The zip is written by a thread (zipfile is blocking) that hands each 1 MB piece to the event loop and waits
until the client has taken it, so a slow client slows the zip down instead of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from sdswarm.web.files import write_zip
from sdswarm.web.redact import Redactor

log = logging.getLogger(__name__)

PIECE_TIMEOUT = 120.0  # a client that takes no byte for this long is dropped


class ZipDownloads:
    def __init__(self, redact: Redactor) -> None:
        self.redact = redact
        self._running: dict[int, tuple[web.Request, asyncio.Event]] = {}

    async def stream(self, request: web.Request, filename: str, entries: list[tuple[Path, str]]) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "application/zip", "Content-Disposition": f'attachment; filename="{filename}"'})
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()

        def send(data: bytes) -> None:
            if gone.is_set():
                raise ConnectionResetError("download abandoned")
            asyncio.run_coroutine_threadsafe(response.write(data), loop).result(timeout=PIECE_TIMEOUT)

        self._running[id(gone)] = (request, gone)  # cut off by end_all at shutdown
        try:
            await response.prepare(request)
            await _in_daemon_thread(write_zip, entries, send, self.redact)
        except asyncio.CancelledError:
            gone.set()  # the thread stops at its next piece instead of writing to a closed response
            raise
        except (ConnectionError, TimeoutError) as exc:
            log.info("checkpoint download ended early: %s", exc or type(exc).__name__)
            return response
        except Exception as exc:  # e.g. the checkpoint pruned mid-download: the headers are sent, so cut it off
            log.warning("checkpoint download failed: %s", self.redact.text(str(exc)))
            if request.transport is not None:
                request.transport.close()  # a truncated chunked body: the client sees an incomplete download
            return response
        finally:
            self._running.pop(id(gone), None)
        await response.write_eof()
        return response

    async def end_all(self, app: web.Application) -> None:
        """At shutdown: cut running downloads off, or a stalled client would hold the node's stop for seconds."""
        for request, gone in list(self._running.values()):
            gone.set()
            if request.transport is not None:
                request.transport.close()


def _in_daemon_thread(function: Callable[..., Any], *args: Any) -> asyncio.Future:
    """Like asyncio.to_thread, but on a daemon thread: a download cut off at shutdown never holds up the exit
    (the default executor's threads are joined when the interpreter ends)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (function(*args), None)
        except BaseException as exc:  # handed to the awaiting coroutine, which decides
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name="ui-download", daemon=True).start()
    return future
