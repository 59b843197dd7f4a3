"""The DHT a node joins the swarm through."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import hivemind

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


def stop_dht(dht: hivemind.DHT) -> None:
    """Shut the DHT down once the messages already sent to it are handled.

    hivemind's tracker sends a last "goodbye" record without waiting for it; a round trip first
    lets the DHT process take it before its parent goes away (else it dies with an EOFError).
    """
    with contextlib.suppress(Exception):
        dht.get_visible_maddrs()
    dht.shutdown()
