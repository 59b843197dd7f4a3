"""The DHT a node joins the swarm through."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import hivemind
import psutil

log = logging.getLogger(__name__)


def start_dht(
    *,
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] = (),
    client_mode: bool = False,
    identity_path: str | None = None,
) -> hivemind.DHT:
    """Start this node's DHT; alone (no initial peers) it is the first node of a new swarm."""
    dht = hivemind.DHT(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None,
        client_mode=client_mode,
        identity_path=identity_path,
        start=True,
    )
    addresses = [str(addr) for addr in dht.get_visible_maddrs()]
    log.info("DHT started (peer id %s); reachable at: %s", dht.peer_id, ", ".join(addresses) or "(client mode)")
    return dht


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
