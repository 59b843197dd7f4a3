"""The node's HTTP server: the I.E endpoints and the web UI (web/app.py), on a thread of its own."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from sdswarm.swarm.admission import ADMIT_PATH
from sdswarm.swarm.exchange import CONFIG_PATH, PEERS_PATH, SWARM_PATH
from sdswarm.swarm.invites import AdmissionError

log = logging.getLogger(__name__)


def exchange_routes(
    config_answer: Callable[[], dict[str, Any]],
    peers_answer: Callable[[], dict[str, Any]],
    swarm_answer: Callable[[], dict[str, Any]],
) -> list[web.RouteDef]:
    """The I.E endpoints; each answer is computed by the node (the web layer only reads)."""

    def handler(answer: Callable[[], dict[str, Any]]):
        async def handle(request: web.Request) -> web.Response:
            # answers may touch the DHT (a blocking call): keep them off the event loop
            return web.json_response(await asyncio.to_thread(answer))

        return handle

    return [
        web.get(CONFIG_PATH, handler(config_answer)),
        web.get(PEERS_PATH, handler(peers_answer)),
        web.get(SWARM_PATH, handler(swarm_answer)),
    ]


def admit_routes(admit: Callable[[Any], dict[str, Any]]) -> list[web.RouteDef]:
    """POST /api/v1/admit on a relay holding the swarm key: an invite and a joiner's public key in, its access token
    out (swarm/admission.py)."""

    async def handle(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.content.read(1 << 14))  # an invite and a key: about 1 KB
        except (ValueError, UnicodeDecodeError):
            return web.json_response({"error": "send JSON: {\"invite\": ..., \"public_key\": ...}"}, status=400)
        try:
            answer = await asyncio.to_thread(admit, body)
        except AdmissionError as exc:  # a ValueError too: caught apart from the body's
            log.warning("refused an invite from %s: %s", request.remote, exc)
            return web.json_response({"error": str(exc)}, status=403)
        return web.json_response(answer)

    return [web.post(ADMIT_PATH, handle)]


class HttpServer:
    """An aiohttp app served from a daemon thread; start() returns the port it really listens on.

    `app` (e.g. the UI from web.app.create_app) gets `routes` added; without one a bare app serves them.
    """

    def __init__(self, routes: list[web.RouteDef], host: str, port: int, *, app: web.Application | None = None) -> None:
        self.app = app if app is not None else web.Application(client_max_size=1 << 20)
        self.app.add_routes(routes)
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        # in-flight requests (a checkpoint download) get a few seconds at stop, not aiohttp's 60: stop() waits 10
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=3.0)
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-server", daemon=True)

    def start(self) -> int:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = future.result(timeout=30)
        log.info("HTTP server listening on %s:%d", self.host, self.port)
        return self.port

    async def _start(self) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"cannot listen on {self.host}:{self.port} for the I.E port: {exc.strerror} "
                          "(is another node running? pick another port in the node settings)") from None
        return site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
