"""The web UI's routes: a live dashboard anyone who reaches the port may read, settings and controls for
whoever holds the admin token.

The UI never reaches into the trainer: it reads the node's snapshot (`NodeAccess.status/history/log_tail`),
lists files in the node's output folder and calls a few control methods. Remove web/ and training is
untouched. Every answer goes through `Redactor`: no local path, no secret leaves the node this way.

    GET  /                                          the page (static/index.html; the rest under /static/)
    GET  /api/ui/status                             state, progress, swarm, data counters, join command
    GET  /api/ui/history?since=T&swarm_since=T2     metrics records after T, the swarm's mean loss after T2
    GET  /api/ui/log?lines=N                        the log tail
    GET  /api/ui/settings                           relay settings, their descriptions, what a restart announces
    POST /api/ui/settings                 admin     {key: value, ...} -> validated, saved, applied on restart
    GET  /api/ui/admin                    admin     200 when the token is right (the page checks it once)
    POST /api/ui/control/{start|stop|checkpoint}  admin
    POST /api/ui/invite                   admin     {hours} -> {command}: a join command with an invite (mother)
    POST /api/ui/ban                      admin     {peer_ids, lift?} -> {banned}: the signed ban list (mother)
    GET  /api/ui/checkpoints                        complete checkpoints, newest first, with download links
    GET  /api/ui/checkpoints/{name}/zip[?state=1]   download  the folder as a zip built on the fly (config.yaml left
                                                              out, local paths taken out of its config files)
    GET  /api/ui/checkpoints/{name}/single-file     download  the original-layout .safetensors export, if one was made
    POST /api/ui/checkpoints/{name}/ticket?kind=K   admin     a download link that works for a minute without the
                                                              token (K: zip, state, single-file), for the page's links
    GET  /api/ui/samples?limit=N                    the latest sample grids
    GET  /api/ui/samples/{name}                     one grid (PNG)
Admin calls take `Authorization: Bearer TOKEN` or `X-Admin-Token: TOKEN`: 401 without, 403 with a wrong one.
Downloads need the token too (or a ticket), unless the node's `public_downloads` setting is on: then anyone may
download a checkpoint's model (not its training state), one public download at a time, each address once per
PUBLIC_DOWNLOAD_INTERVAL. Bad input is a 400 naming what was wrong, never a 500.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from sdswarm.config import ConfigError
from sdswarm.swarm.settings import NodeSettings
from sdswarm.web import files
from sdswarm.web.auth import token_from_headers, token_matches
from sdswarm.web.download import ZipDownloads
from sdswarm.web.redact import Redactor

log = logging.getLogger(__name__)

API = "/api/ui"
STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024  # a settings change is a few hundred bytes; chunked or not, no body is read past this
BODY_TIMEOUT = 20.0  # seconds to send that body
MAX_DOWNLOADS = 2  # downloads at once: each reads a checkpoint from disk at full speed and uses the node's upload
MAX_PUBLIC_DOWNLOADS = 1  # of those, without the admin token (public_downloads): the admin always has a slot
PUBLIC_DOWNLOAD_INTERVAL = 600.0  # seconds between two public downloads from one address
TICKET_SECONDS = 60.0  # how long a download ticket works
DOWNLOAD_KINDS = ("zip", "state", "single-file")
CONTROL_WAIT = 2.0  # seconds a control call is awaited before the answer says "accepted"
SNAPSHOT_TTL = 1.0  # seconds a status or history answer is shared between requests
SWARM_HISTORY = 20_000  # swarm samples kept in memory (over a day at one per 5 s)


class NodeAccess(Protocol):
    """What a node gives its UI. The node implements it (node.py); the UI only calls these."""

    output_dir: Path  # checkpoints/, samples/ and metrics.jsonl live here

    def status(self) -> dict:
        """JSON-able snapshot: {"state": "training"|"stopped"|"starting", "progress": {...}, "swarm": {...},
        "data": {...}, "join_command": str | None, "announced": [multiaddr, ...], "run_id": str}."""
        ...

    def history(self) -> list[dict]:
        """Metrics records, oldest first: {time, step, loss, loss_avg, samples_per_second, local_epoch,
        swarm_epoch (swarm steps, by hivemind's counters), swarm_samples, target_batch_size}."""
        ...

    def log_tail(self, lines: int) -> list[str]: ...

    def settings(self) -> NodeSettings: ...

    def update_settings(self, changes: dict) -> NodeSettings:
        """Validate and save; raise ConfigError naming the bad key."""
        ...

    def start(self) -> None:
        """Start training (from the newest checkpoint) if stopped."""
        ...

    def stop(self) -> None:
        """Graceful: a checkpoint first, then training stops; the node and its UI stay up."""
        ...

    def save_checkpoint(self) -> None:
        """A checkpoint at the next step."""
        ...

    def invite(self, hours: float) -> str:
        """A join command with an invite for one peer; ConfigError where this node holds no swarm key."""
        ...

    def ban(self, peer_ids: list[str], lift: bool) -> list[str]:
        """Ban (or `lift` the ban on) peers; the banned peers after it. ConfigError for a bad peer id or no key."""
        ...


def create_app(node: NodeAccess, *, admin_token: str, swarm_period: float = 5.0,
               private_paths: tuple[Path, ...] = (), public_downloads: bool = False) -> web.Application:
    """The UI's routes on an app of their own (HttpServer(..., app=) adds the I.E routes to it).

    `swarm_period`: how often the swarm's mean loss is sampled for the chart (peers publish every 5 s).
    `private_paths`: folders outside the output folder whose names must not show (a data folder, a cache).
    `public_downloads`: checkpoints' models may be downloaded without the admin token (rate-limited).
    """
    if len(admin_token) < 16:
        raise ValueError("the admin token must be at least 16 characters (see web.auth.load_or_create_token)")
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_json_errors])
    ui = _UI(node, admin_token, Redactor(node.output_dir, secrets=[admin_token], private_paths=private_paths),
             public_downloads=public_downloads)
    app.add_routes([
        web.get("/", ui.index),
        web.get(f"{API}/status", ui.status),
        web.get(f"{API}/history", ui.history),
        web.get(f"{API}/log", ui.log_tail),
        web.get(f"{API}/settings", ui.get_settings),
        web.post(f"{API}/settings", ui.admin(ui.post_settings)),
        web.get(f"{API}/admin", ui.admin(ui.check_admin)),
        web.post(API + "/control/{action}", ui.admin(ui.control)),
        web.post(f"{API}/invite", ui.admin(ui.invite)),
        web.post(f"{API}/ban", ui.admin(ui.ban)),
        web.get(f"{API}/checkpoints", ui.checkpoints),
        web.get(API + "/checkpoints/{name}/zip", ui.checkpoint_zip),
        web.get(API + "/checkpoints/{name}/single-file", ui.checkpoint_single_file),
        web.post(API + "/checkpoints/{name}/ticket", ui.admin(ui.download_ticket)),
        web.get(f"{API}/samples", ui.samples),
        web.get(API + "/samples/{name}", ui.sample),
        web.static("/static", STATIC_DIR, follow_symlinks=False, show_index=False),
    ])
    app.on_response_prepare.append(_security_headers)
    app.on_shutdown.append(ui.zips.end_all)

    async def sample_swarm(app: web.Application):
        task = asyncio.create_task(ui.sample_swarm_forever(swarm_period))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(sample_swarm)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _UI:
    def __init__(self, node: NodeAccess, admin_token: str, redact: Redactor, *, public_downloads: bool) -> None:
        self.node, self.token, self.redact = node, admin_token, redact
        self.public_downloads = public_downloads
        self.swarm_history: collections.deque[dict] = collections.deque(maxlen=SWARM_HISTORY)
        self.zips = ZipDownloads(redact)
        self.downloading = {"admin": 0, "public": 0}
        self._public_starts: dict[str, float] = {}  # client address -> when its last public download started
        self._snapshots: dict[str, tuple[float, Any]] = {}
        self._snapshot_locks = {"status": asyncio.Lock(), "history": asyncio.Lock()}
        self._checkpoint_listing: tuple[tuple | None, list[dict]] = (None, [])  # (files.checkpoints_version, answer)

    async def snapshot(self, name: str, read: Callable[[], Any]) -> Any:
        """The node's answer, reused for SNAPSHOT_TTL: ten open tabs cost the node one call a second, not ten
        (a status may ask the DHT, a history read the metrics file)."""
        async with self._snapshot_locks[name]:
            taken, value = self._snapshots.get(name, (-math.inf, None))
            if time.monotonic() - taken > SNAPSHOT_TTL:
                value = await asyncio.to_thread(read)
                self._snapshots[name] = (time.monotonic(), value)
            return value

    def json(self, data: Any, status: int = 200) -> web.Response:
        return web.json_response(self.redact(data), status=status)

    def error(self, status: int, message: str, **extra: Any) -> web.Response:
        return self.json({"error": message, **extra}, status=status)

    # --- auth -------------------------------------------------------------------------------------------

    def admin(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            given = token_from_headers(request.headers)
            if given is None:
                response = self.error(401, "admin token required: send it as 'Authorization: Bearer TOKEN' "
                                      "(the node prints it at start-up and keeps it in its folder, admin_token)")
                response.headers["WWW-Authenticate"] = 'Bearer realm="sdswarm"'
                return response
            if not token_matches(given, self.token):
                return self.error(403, "wrong admin token")
            return await handler(request)

        return guarded

    async def check_admin(self, request: web.Request) -> web.Response:
        return self.json({"admin": True})

    # --- the page and the snapshot ----------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def status(self, request: web.Request) -> web.Response:
        status = await self.snapshot("status", self.node.status)
        return self.json({**status, "server_time": time.time()})

    async def history(self, request: web.Request) -> web.Response:
        # two clocks: the node's records and this UI's swarm samples are asked for from their own last time
        since = _query_number(request, "since", 0.0, float, 0.0, math.inf)
        swarm_since = _query_number(request, "swarm_since", 0.0, float, 0.0, math.inf)
        limit = _query_number(request, "limit", 3000, int, 10, 100_000)
        records = await self.snapshot("history", self.node.history)
        local = [r for r in records if isinstance(r, dict) and _number(r.get("time")) > since]
        swarm = [r for r in self.swarm_history if r["time"] > swarm_since]
        downsampled = len(local) > limit or len(swarm) > limit
        return self.json({"local": _thin(local, limit), "swarm": _thin(swarm, limit), "downsampled": downsampled})

    async def log_tail(self, request: web.Request) -> web.Response:
        lines = _query_number(request, "lines", 200, int, 1, 2000)
        return self.json({"lines": await asyncio.to_thread(self.node.log_tail, lines)})

    async def sample_swarm_forever(self, period: float) -> None:
        """The swarm's loss over time: the mean of the peers' published losses, sampled every `period`."""
        while True:
            try:
                record = swarm_record(await self.snapshot("status", self.node.status))
                if record is not None:
                    self.swarm_history.append(record)
            except Exception as exc:  # a failing snapshot must not end the sampling (or the UI)
                log.debug("swarm sample failed: %s", exc)
            await asyncio.sleep(period)

    # --- settings and controls --------------------------------------------------------------------------

    async def get_settings(self, request: web.Request) -> web.Response:
        return self.json(settings_view(await asyncio.to_thread(self.node.settings)))

    async def post_settings(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY:
            return self.error(413, f"settings change too large (over {MAX_BODY} bytes)")
        try:
            # read() stops at the app's client_max_size (MAX_BODY) for a chunked body too: a 413
            changes = json.loads(await asyncio.wait_for(request.read(), BODY_TIMEOUT))
        except TimeoutError:
            return self.error(408, f"the settings change did not arrive within {BODY_TIMEOUT:g} s")
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested deeper than any settings change
            return self.error(400, "send the changes as a JSON object, e.g. {\"mode\": \"relay\"}")
        if not isinstance(changes, dict) or not changes:
            return self.error(400, "send the changes as a non-empty JSON object, e.g. {\"mode\": \"relay\"}")
        try:
            saved = await asyncio.to_thread(self.node.update_settings, changes)
        except ConfigError as exc:
            return self.error(400, str(exc), keys=list(exc.keys))
        return self.json({**settings_view(saved), "saved": True})

    async def control(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        calls = {"start": self.node.start, "stop": self.node.stop, "checkpoint": self.node.save_checkpoint}
        if action not in calls:
            return self.error(404, f"unknown control '{action}': one of {', '.join(calls)}")
        task = asyncio.ensure_future(asyncio.to_thread(calls[action]))
        task.add_done_callback(lambda _: self._snapshots.clear())  # the next status shows what it changed
        try:
            # a stop writes a checkpoint first (minutes on a big model): answer "accepted" rather than hang
            await asyncio.wait_for(asyncio.shield(task), CONTROL_WAIT)
        except TimeoutError:
            task.add_done_callback(_log_failure(action))
            return self.json({"action": action, "done": False, "accepted": True}, status=202)
        except (RuntimeError, ValueError) as exc:
            return self.error(409, f"cannot {action}: {exc}")
        return self.json({"action": action, "done": True, "accepted": True})

    # --- admission (swarm/admission.py) --------------------------------------------------------------------

    async def invite(self, request: web.Request) -> web.Response:
        body = await self._small_json(request)
        hours = body.get("hours", 24) if isinstance(body, dict) else None
        if isinstance(hours, bool) or not isinstance(hours, int | float) or not 0 < hours <= 24 * 365:
            return self.error(400, "send {\"hours\": H}: how long the invite may be used, above 0 (default 24)")
        try:
            return self.json({"command": await asyncio.to_thread(self.node.invite, float(hours))})
        except ConfigError as exc:
            return self.error(409, str(exc))

    async def ban(self, request: web.Request) -> web.Response:
        body = await self._small_json(request)
        peers = body.get("peer_ids") if isinstance(body, dict) else None
        if not isinstance(peers, list) or not peers or not all(isinstance(p, str) for p in peers):
            return self.error(400, "send {\"peer_ids\": [PEER_ID, ...]} (and \"lift\": true to lift their ban)")
        try:
            banned = await asyncio.to_thread(self.node.ban, peers, body.get("lift") is True)
        except ConfigError as exc:
            return self.error(400, str(exc))
        return self.json({"banned": banned})

    @staticmethod
    async def _small_json(request: web.Request) -> object:
        try:
            return json.loads(await request.content.read(MAX_BODY) or b"{}")
        except (ValueError, UnicodeDecodeError):
            return None

    # --- files -------------------------------------------------------------------------------------------

    async def checkpoints(self, request: web.Request) -> web.Response:
        def listing() -> list[dict]:
            # sizing a checkpoint walks its files: done again only when the folder changed
            version = files.checkpoints_version(self.node.output_dir)
            if self._checkpoint_listing[0] != version:
                self._checkpoint_listing = (version, build())
            return self._checkpoint_listing[1]

        def build() -> list[dict]:
            answer = []
            for c in files.list_checkpoints(self.node.output_dir):
                base = f"{API}/checkpoints/{c.name}"
                answer.append({
                    "name": c.name, "step": c.step, "time": c.time,
                    "model_bytes": files.folder_size(c, with_state=False),
                    "state_bytes": _size(c.path / files.STATE_FILE),
                    "zip": f"{base}/zip", "zip_with_state": f"{base}/zip?state=1", "ticket": f"{base}/ticket",
                    "single_file": f"{base}/single-file" if c.single_file else None,
                    "single_file_bytes": _size(c.single_file) if c.single_file else None,
                })
            return answer

        return self.json({"checkpoints": await asyncio.to_thread(listing), "public_downloads": self.public_downloads})

    async def checkpoint_zip(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        with_state = request.query.get("state", "0").lower() in ("1", "true", "yes")
        kind = "state" if with_state else "zip"
        checkpoint = await asyncio.to_thread(files.find_checkpoint, self.node.output_dir, name)
        if checkpoint is None:
            return self.error(404, "no such checkpoint (see /api/ui/checkpoints)")
        who = self.download_access(request, kind, name)
        if isinstance(who, web.Response):
            return who
        entries = await asyncio.to_thread(checkpoint.files, with_state=with_state)
        with self.download_slot(request, who) as refused:
            if refused is not None:
                return refused
            return await self.zips.stream(request, f"{checkpoint.name}{'' if with_state else '-model'}.zip", entries)

    async def checkpoint_single_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        checkpoint = await asyncio.to_thread(files.find_checkpoint, self.node.output_dir, name)
        if checkpoint is None or checkpoint.single_file is None:
            return self.error(404, "no single-file export of this checkpoint (see /api/ui/checkpoints)")
        who = self.download_access(request, "single-file", name)
        if isinstance(who, web.Response):
            return who
        with self.download_slot(request, who) as refused:
            if refused is not None:
                return refused
            response = web.FileResponse(checkpoint.single_file, headers={
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f'attachment; filename="{checkpoint.name}.safetensors"'})
            with contextlib.suppress(ConnectionError):  # sent here, so that the slot is held while it is sent
                await response.prepare(request)
            return response

    async def download_ticket(self, request: web.Request) -> web.Response:
        """A link to one download that works for TICKET_SECONDS without the token: the page's download links are
        plain links (a 12 GB zip cannot go through a script), and a link cannot carry an Authorization header."""
        name, kind = request.match_info["name"], request.query.get("kind", "zip")
        if kind not in DOWNLOAD_KINDS:
            return self.error(400, f"'kind' must be one of {', '.join(DOWNLOAD_KINDS)}, got {kind[:40]!r}")
        if await asyncio.to_thread(files.find_checkpoint, self.node.output_dir, name) is None:
            return self.error(404, "no such checkpoint (see /api/ui/checkpoints)")
        expires = int(time.time() + TICKET_SECONDS)
        path = f"{API}/checkpoints/{name}/" + ("single-file?" if kind == "single-file" else
                                                "zip?state=1&" if kind == "state" else "zip?")
        return self.json({"url": f"{path}ticket={expires}-{self._ticket_mac(kind, name, expires)}",
                          "expires": expires})

    def _ticket_mac(self, kind: str, name: str, expires: int) -> str:
        message = f"sdswarm-download:{kind}:{name}:{expires}".encode()
        return hmac.new(self.token.encode("utf-8"), message, hashlib.sha256).hexdigest()[:40]

    def _ticket_valid(self, ticket: str, kind: str, name: str) -> bool:
        expires, _, mac = ticket.partition("-")
        if not expires.isdigit() or len(expires) > 12 or not 0 <= int(expires) - time.time() <= TICKET_SECONDS + 1:
            return False
        return hmac.compare_digest(mac.encode("ascii", "replace"), self._ticket_mac(kind, name, int(expires)).encode())

    def download_access(self, request: web.Request, kind: str, name: str) -> str | web.Response:
        """'admin' (the token, or a ticket for this very download), 'public' (public_downloads, a model), or the
        answer refusing the download."""
        given = token_from_headers(request.headers)
        if given is not None:
            return "admin" if token_matches(given, self.token) else self.error(403, "wrong admin token")
        ticket = request.query.get("ticket")
        if ticket is not None:
            if self._ticket_valid(ticket, kind, name):
                return "admin"
            return self.error(403, "this download link has expired or is not for this file: download it again from "
                                   "the page")
        if self.public_downloads and kind != "state":
            return "public"
        what = "a checkpoint's training state" if kind == "state" else "checkpoints"
        response = self.error(401, f"downloading {what} needs the admin token: send it as 'Authorization: Bearer "
                                   "TOKEN', or use the page's links after giving it the token"
                                   + ("" if kind == "state" else "; a node may let anyone download its models with "
                                      "the setting public_downloads: true"))
        response.headers["WWW-Authenticate"] = 'Bearer realm="sdswarm"'
        return response

    @contextlib.contextmanager
    def download_slot(self, request: web.Request, who: str):
        """Hold one of the MAX_DOWNLOADS slots while a download runs; yields None, or the answer refusing it (all
        slots busy; a public one beyond MAX_PUBLIC_DOWNLOADS or too soon after this address's last)."""
        now = time.monotonic()
        address = request.remote or "?"
        refused = None
        if sum(self.downloading.values()) >= MAX_DOWNLOADS or (
                who == "public" and self.downloading["public"] >= MAX_PUBLIC_DOWNLOADS):
            refused = self.error(503, f"{MAX_DOWNLOADS} downloads are running; try again in a minute")
            refused.headers["Retry-After"] = "60"
        elif who == "public" and now - self._public_starts.get(address, -math.inf) < PUBLIC_DOWNLOAD_INTERVAL:
            wait = PUBLIC_DOWNLOAD_INTERVAL - (now - self._public_starts[address])
            refused = self.error(429, f"one public download per {PUBLIC_DOWNLOAD_INTERVAL / 60:g} minutes from one "
                                      f"address: try again in {wait / 60:.0f} minutes")
            refused.headers["Retry-After"] = str(math.ceil(wait))
        if refused is not None:
            yield refused
            return
        if who == "public":
            self._public_starts = {a: t for a, t in self._public_starts.items() if now - t < PUBLIC_DOWNLOAD_INTERVAL}
            self._public_starts[address] = now
        self.downloading[who] += 1
        try:
            yield None
        finally:
            self.downloading[who] -= 1

    async def samples(self, request: web.Request) -> web.Response:
        limit = _query_number(request, "limit", 4, int, 1, 50)
        found = (await asyncio.to_thread(files.list_samples, self.node.output_dir))[:limit]
        return self.json({"samples": [{"name": s.name, "step": s.step, "time": s.time,
                                       "url": f"{API}/samples/{s.name}"} for s in found]})

    async def sample(self, request: web.Request) -> web.StreamResponse:
        sample = await asyncio.to_thread(files.find_sample, self.node.output_dir, request.match_info["name"])
        if sample is None:
            return self.error(404, "no such sample grid (see /api/ui/samples)")
        return web.FileResponse(sample.path, headers={"Content-Type": "image/png", "Cache-Control": "max-age=60"})


def settings_view(settings: NodeSettings) -> dict[str, Any]:
    """The settings with their descriptions, and what the node will listen on and announce after a restart."""
    fields = {name: {"description": field.description, "default": field.default}
              for name, field in NodeSettings.model_fields.items()}
    join = None
    if not settings.client_mode:
        host = settings.public_address or settings.listen_host
        port = settings.ie_port_external if settings.ie_port_external is not None else settings.ie_port_internal
        join = f"sdswarm join {host}:{port}"
    return {
        "settings": settings.model_dump(mode="json"),
        "fields": fields,
        "after_restart": {"dht_listen": settings.dht_host_maddrs(), "dht_announce": settings.dht_announce_maddrs(),
                          "join_command": join},
        "applied": "on restart",
    }


def swarm_record(status: dict) -> dict | None:
    """One point of the swarm chart: the mean of the peers' losses and the swarm's throughput."""
    swarm = status.get("swarm") if isinstance(status, dict) else None
    if not isinstance(swarm, dict):
        return None
    peers = [p for p in swarm.get("peers") or [] if isinstance(p, dict)]
    losses = [_number(p.get("loss")) for p in peers]
    losses = [x for x in losses if math.isfinite(x)]
    return {
        "time": time.time(),
        "loss": sum(losses) / len(losses) if losses else None,
        "samples_per_second": _number(swarm.get("samples_per_second")),
        "peers": len(peers),
        "epoch": swarm.get("epoch"),
    }


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """API errors as JSON with a message; never a traceback or an HTML page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if not request.path.startswith("/api/") or exc.status < 400:
            raise
        return web.json_response({"error": exc.reason if exc.text is None else exc.text.removeprefix(
            f"{exc.status}: ")}, status=exc.status)
    except Exception:
        log.exception("web UI: %s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error (the node's log has the details)"}, status=500)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers["Server"] = "sdswarm"  # not the Python and aiohttp versions
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["X-Frame-Options"] = "DENY"
    # the page loads only its own files: nothing from a CDN, no inline script for an injection to ride on
    headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                          "script-src 'self'; object-src 'none'; base-uri 'none'; "
                                          "frame-ancestors 'none'; form-action 'self'")
    if request.path.startswith(API) and "Cache-Control" not in headers:
        headers["Cache-Control"] = "no-store"


class _BadQuery(web.HTTPBadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(text=message)


def _query_number(request: web.Request, key: str, default, kind, low, high):
    raw = request.query.get(key)
    if raw is None or raw == "":
        return default
    allowed = f"at least {low}" if math.isinf(high) else f"between {low} and {high}"
    try:
        value = kind(raw)
    except ValueError:
        raise _BadQuery(f"'{key}' must be a{'n integer' if kind is int else ' number'} {allowed}, "
                        f"got {raw[:40]!r}") from None
    if not (low <= value <= high) or (kind is float and math.isnan(value)):
        raise _BadQuery(f"'{key}' must be {allowed}, got {raw[:40]!r}")
    return value


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _thin(records: list, limit: int) -> list:
    """At most `limit` records, evenly spaced over the whole run, the newest always kept."""
    if len(records) <= limit:
        return list(records)
    last = len(records) - 1
    return [records[round(i * last / (limit - 1))] for i in range(limit)]


def _size(path: Path | None) -> int | None:
    try:
        return path.stat().st_size if path is not None else None
    except OSError:
        return None


def _log_failure(action: str) -> Callable[[asyncio.Future], None]:
    def report(task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("web UI: %s failed: %s", action, task.exception())

    return report
