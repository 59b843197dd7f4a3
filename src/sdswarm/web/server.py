"""The node's HTTP server: the I.E endpoints and the web UI (web/app.py), on a thread of its own.

The port may face the internet (a relay's I.E port), so the server guards its own door: a client has
HEADER_TIMEOUT seconds to send a request's headers (and an idle keep-alive connection is closed after as long),
at most MAX_CONNECTIONS are open at once (more get a 503 and are closed), and a connection that arrives on a
loopback address must name a loopback host (a web page in the user's browser cannot reach the UI through a
DNS name rebound to 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sdswarm.swarm.admission import ADMIT_PATH
from sdswarm.swarm.exchange import CONFIG_PATH, PEERS_PATH, SWARM_PATH
from sdswarm.swarm.invites import AdmissionError

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 20.0  # seconds to send a request's headers; also how long an idle keep-alive connection stays
MAX_CONNECTIONS = 64  # open at once: a few UI tabs, joiners asking the I.E, two downloads


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

    def __init__(self, routes: list[web.RouteDef], host: str, port: int, *, app: web.Application | None = None,
                 header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        self.app = app if app is not None else web.Application(client_max_size=1 << 20)
        self.app.add_routes(routes)
        self.app.middlewares.insert(0, loopback_host_check)
        self.host, self.port, self.max_connections = host, port, max_connections
        self._loop = asyncio.new_event_loop()
        # in-flight requests (a checkpoint download) get a few seconds at stop, not aiohttp's 60: stop() waits 10.
        # aiohttp's keep-alive timer starts with the connection and closes it while no complete request has come:
        # the header-read timeout
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=3.0, keepalive_timeout=header_timeout)
        self._listener: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-server", daemon=True)

    def start(self) -> int:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = future.result(timeout=30)
        log.info("HTTP server listening on %s:%d", self.host, self.port)
        return self.port

    async def _start(self) -> int:
        await self._runner.setup()
        server = self._runner.server  # aiohttp's protocol factory; it knows the open connections
        assert server is not None

        def connection() -> asyncio.Protocol:
            return server() if len(server.connections) < self.max_connections else _Busy()

        try:
            self._listener = await self._loop.create_server(connection, self.host, self.port, reuse_address=True)
        except OSError as exc:
            raise OSError(f"cannot listen on {self.host}:{self.port} for the I.E port: {exc.strerror} "
                          "(is another node running? pick another port in the node settings)") from None
        return self._listener.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class _Busy(asyncio.Protocol):
    """A connection over MAX_CONNECTIONS: one short answer, then closed."""

    BODY = json.dumps({"error": "too many connections to this node; try again in a few seconds"}).encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(self.BODY), self.BODY))
        transport.close()


@web.middleware
async def loopback_host_check(request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """A request that came in on a loopback address must name a loopback host: a page on another site that rebinds
    its DNS name to 127.0.0.1 reaches the port, but its requests still carry its own name."""
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    host = request.headers.get("Host")
    if sockname and host is not None and _is_loopback(str(sockname[0])) and not _names_loopback(host):
        return web.json_response({"error": f"this node answers on {sockname[0]} only to requests for localhost or "
                                           f"127.0.0.1, not for {host[:64]!r} (open http://127.0.0.1:{sockname[1]}/)"},
                                 status=400)
    return await handler(request)


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _names_loopback(host: str) -> bool:
    """A Host header (name or address, with or without a port) naming this machine's loopback."""
    host = host.strip()
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name, _, port = host.rpartition(":")
        name = name if name and port.isdigit() else host
    name = name.lower().rstrip(".")
    # 0.0.0.0 and :: reach this machine too (a relay on 0.0.0.0 without a public address prints 0.0.0.0:PORT)
    return name in ("localhost", "0.0.0.0", "::") or name.endswith(".localhost") or _is_loopback(name)
