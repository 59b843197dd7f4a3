"""The DHT a node joins the swarm through, and the peers it remembers to rejoin it after a restart."""

from __future__ import annotations

import asyncio.subprocess
import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import hivemind
import psutil

from sdswarm.atomic import write_atomic
from sdswarm.swarm.exchange import ExchangeError, fetch_peers

log = logging.getLogger(__name__)

PEERS_FILE = "peers"  # OUTPUT/peers: the addresses of the peers this node last saw, one a line
MAX_REMEMBERED = 32
_HELD_TASKS: set[asyncio.Task] = set()


def start_dht(
    *,
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] = (),
    client_mode: bool = False,
    identity_path: str | None = None,
    **options,
) -> hivemind.DHT:
    """Start this node's DHT; alone (no initial peers) it is the first node of a new swarm. `options`: hivemind's
    (the authorizer and record validators of swarm/admission.py)."""
    with _p2p_daemon_in_its_own_session():
        dht = hivemind.DHT(
            initial_peers=list(initial_peers),
            host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) or None,
            client_mode=client_mode,
            identity_path=identity_path,
            start=True,
            **options,
        )
    addresses = [str(addr) for addr in dht.get_visible_maddrs()]
    log.info("DHT started (peer id %s); reachable at: %s", dht.peer_id, ", ".join(addresses) or "(client mode)")
    return dht


@contextlib.contextmanager
def _p2p_daemon_in_its_own_session() -> Iterator[None]:
    """The DHT process (forked here) starts hivemind's p2pd: start it in a session of its own.

    A group's SIGTERM (systemd, a test, `kill -- -PGID`) would kill p2pd at once, the Go default, and the node
    could then neither finish its last averaging round nor say goodbye to its peers. stop_dht and reap_children
    still end it (it stays this node's child), and a p2pd whose node was killed exits when idle (30 s)."""
    original = asyncio.subprocess.create_subprocess_exec

    async def create(program, *args, **kwargs):
        if os.path.basename(str(program)) == "p2pd":
            kwargs.setdefault("start_new_session", True)
        return await original(program, *args, **kwargs)

    asyncio.subprocess.create_subprocess_exec = create
    try:
        yield
    finally:  # the forked DHT process keeps its own copy of the patch
        asyncio.subprocess.create_subprocess_exec = original


def start_dht_rejoining(candidates: Sequence[str], **dht_options) -> hivemind.DHT:
    """Start the DHT from the first of `candidates` that answers (DHT multiaddrs, or relays' I.E addresses asked
    for their DHT addresses); alone if none does, saying so."""
    maddrs: list[str] = []
    for candidate in dict.fromkeys(candidates):
        if candidate.startswith("/"):
            maddrs.append(candidate)
            continue
        try:
            maddrs += fetch_peers(candidate)
        except ExchangeError as exc:
            log.info("known relay %s does not answer (%s)", candidate, exc)
    if maddrs:
        try:
            dht = start_dht(initial_peers=maddrs, **dht_options)
            log.info("rejoined the swarm through %d known addresses", len(maddrs))
            return dht
        except Exception as exc:  # hivemind: no initial peer reachable
            log.warning("none of the %d known peer addresses answered (%s)", len(maddrs), exc)
    if candidates:
        log.warning("starting alone: no peer this node knew answers (a swarm that is still running can be "
                    "rejoined with --peers RELAY_HOST:PORT)")
    return start_dht(initial_peers=(), **dht_options)


def remember_peers(output_dir: Path, addresses: Sequence[str]) -> None:
    """Keep the peers' addresses (atomically: a crash never leaves half a file) for the next start."""
    lines = [a for a in dict.fromkeys(addresses) if a and "\n" not in a][:MAX_REMEMBERED]
    if not lines:
        return
    write_atomic(output_dir / PEERS_FILE, "".join(f"{line}\n" for line in lines).encode("utf-8"))


def remembered_peers(output_dir: Path) -> list[str]:
    path = output_dir / PEERS_FILE
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def connected_peer_addresses(dht: hivemind.DHT, timeout: float = 10.0) -> list[str]:
    """The DHT multiaddrs (with /p2p/ id) of the peers this node is connected to now; none if the DHT does not
    answer in `timeout` seconds.

    Bounded: hivemind can lose the coroutine's task (it logged "Task was destroyed but it is pending" when a peer
    restarted) and never answer; the node's telemetry thread, which calls this after each publication, then stopped
    for good, and every swarm view lost this peer a minute later."""
    future = dht.run_coroutine(partial(_connected_addresses, timeout=timeout), return_future=True)
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()
        log.debug("the DHT did not list its connections in %.0f s", timeout)
        return []


async def _connected_addresses(_dht: hivemind.DHT, node, timeout: float) -> list[str]:  # in the DHT process
    with held_task():
        peers = await asyncio.wait_for(node.p2p.list_peers(), timeout)
    return [f"{addr}/p2p/{info.peer_id}" for info in peers for addr in info.addrs
            if "/tcp/" in str(addr) and "p2p-circuit" not in str(addr)]


@contextlib.contextmanager
def held_task() -> Iterator[None]:
    """Keep the running asyncio task alive until the block ends. The event loop holds tasks weakly, and hivemind
    starts the DHT's and its RPC handlers' tasks without keeping them: a task whose wait nothing else reaches (an
    MPFuture, which hivemind holds weakly; a client stream's reader) was destroyed mid-wait by the garbage collector
    ("Task was destroyed but it is pending!"), and its work lost: a round's tensor part, a list of peers."""
    task = asyncio.current_task()
    _HELD_TASKS.add(task)
    try:
        yield
    finally:
        _HELD_TASKS.discard(task)


def stop_dht(dht: hivemind.DHT, timeout: float = 10.0) -> None:
    """Shut the DHT down once the messages already sent to it are handled, within `timeout` seconds.

    hivemind's tracker sends a last "goodbye" record without waiting for it; a round trip first lets the
    DHT process take it before its parent goes away (else it dies with an EOFError). The round trip is
    bounded: a message from an averager process that already exited can leave the DHT unable to answer,
    and then the DHT is terminated, its p2pd daemon with it.
    """
    async def _noop(_dht, _node) -> None:
        return None

    daemons: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):  # its p2pd daemon, which a hard-terminated DHT would orphan
        daemons = psutil.Process(dht.pid).children(recursive=True)
    with contextlib.suppress(Exception):
        dht.run_coroutine(_noop, return_future=True).result(timeout=timeout)
    dht.shutdown()
    _stop(daemons)


def reap_children() -> None:
    """Make sure every process this node started (DHT, averagers, p2pd) ends with it."""
    # torch_shm_manager is torch's own: it leaves when this process does, and killing it first aborts us
    _stop([c for c in psutil.Process().children(recursive=True) if _name(c) != "torch_shm_manager"])


def _stop(processes: list[psutil.Process], grace: float = 5.0) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        log.warning("process %d (%s) did not stop in %.0f s: killing it", process.pid, _name(process), grace)
        with contextlib.suppress(psutil.Error):
            process.kill()


def _name(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return process.name()
    return "?"
