"""What each peer tells the swarm about itself, through the DHT; and the swarm as any node sees it."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any, Literal

import hivemind
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)

EXPIRATION = 60.0  # a peer that stops publishing drops out of the view after this long


class PeerMetrics(BaseModel):
    peer_id: str
    role: Literal["mother", "relay", "client"]
    address: str | None = None  # the join address (host:port of its I.E endpoint) for relays
    step: int = 0
    samples_seen: int = 0
    loss: float | None = None  # smoothed
    samples_per_second: float = 0.0
    local_epoch: int = 0  # the swarm step its weights are at (hivemind's name, as every peer reads it)
    data_slot: int | None = None  # its slot in the shard plan (data/shards.py); None until chosen
    time: float = 0.0


class SwarmView(BaseModel):
    """The swarm's state as this node sees it: what `sdswarm status` prints and the dashboard shows."""

    run_id: str
    epoch: int  # the newest swarm step any peer reports (hivemind's global epoch; the I.E answer's field name)
    samples_toward_target: int
    target_batch_size: int
    samples_per_second: float
    peers: list[PeerMetrics]


def metrics_key(run_id: str) -> str:
    return f"{run_id}_sdswarm_metrics"


def publish(dht: hivemind.DHT, run_id: str, metrics: PeerMetrics) -> None:
    dht.store(metrics_key(run_id), subkey=metrics.peer_id, value=metrics.model_dump(),
              expiration_time=get_dht_time() + EXPIRATION)


def read_peers(dht: hivemind.DHT, run_id: str) -> list[PeerMetrics]:
    """The metrics the live peers publish (one DHT lookup)."""
    peers = []
    for peer_id, entry in _entries(dht, metrics_key(run_id)):
        try:
            peers.append(PeerMetrics.model_validate(entry))
        except ValidationError:
            log.debug("ignoring malformed metrics from %s", peer_id)  # a peer's word is never trusted blindly
    return peers


def read_swarm(dht: hivemind.DHT, run_id: str, target_batch_size: int) -> SwarmView:
    peers = read_peers(dht, run_id)
    progress = [entry for _, entry in _entries(dht, f"{run_id}_progress") if isinstance(entry, dict)]
    epochs = [int(p.get("epoch", 0)) for p in progress if isinstance(p.get("epoch"), int)]
    epoch = max(epochs, default=max((p.local_epoch for p in peers), default=0))
    toward = sum(int(p.get("samples_accumulated", 0)) for p in progress if p.get("epoch") == epoch)
    rate = sum(p.samples_per_second for p in peers if math.isfinite(p.samples_per_second))
    return SwarmView(run_id=run_id, epoch=epoch, samples_toward_target=toward, target_batch_size=target_batch_size,
                     samples_per_second=rate, peers=sorted(peers, key=lambda p: p.peer_id))


def _entries(dht: hivemind.DHT, key: str) -> list[tuple[Any, Any]]:
    found = dht.get(key, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    return [(subkey, item.value) for subkey, item in found.value.items() if item is not None]


class Publisher(threading.Thread):
    """Publishes this peer's metrics every `period` seconds until stopped."""

    def __init__(self, dht: hivemind.DHT, run_id: str, snapshot: Callable[[], PeerMetrics], period: float = 5.0):
        super().__init__(name="telemetry", daemon=True)
        self.dht, self.run_id, self.snapshot, self.period = dht, run_id, snapshot, period
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                publish(self.dht, self.run_id, self.snapshot())
            except Exception as exc:  # telemetry must never take training down
                log.debug("could not publish metrics: %s", exc)
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=self.period + 5)


def wait_for_peers(dht: hivemind.DHT, run_id: str, peer_id: str, count: int, timeout: float) -> int:
    """Start-up barrier: wait until `count` peers have announced themselves, so the first swarm step is shared.

    Without it, the first peer up makes swarm step 0 alone and the others start out of sync.
    Returns how many peers were seen; going on after the timeout with fewer is logged, not fatal.
    """
    key, deadline = f"{run_id}_sdswarm_barrier", get_dht_time() + timeout
    seen = 0
    while True:
        dht.store(key, subkey=peer_id, value=get_dht_time(), expiration_time=get_dht_time() + max(timeout, 60.0))
        seen = len(_entries(dht, key))
        if seen >= count:
            return seen
        if get_dht_time() >= deadline:
            log.warning("start-up barrier: %d of %d peers after %.0f s; training anyway", seen, count, timeout)
            return seen
        log.info("start-up barrier: %d of %d peers here, waiting", seen, count)
        threading.Event().wait(1.0)


def wait_for_progress_from(optimizer: hivemind.Optimizer, count: int, timeout: float) -> int:
    """Second half of the start-up barrier, after this peer's first local step.

    hivemind's progress tracker hears of a peer only once it has reported samples, and looks again only every
    few seconds. Without this wait a fast peer can reach the target batch on its own samples before it sees the
    others, and its first swarm step is a local step that the others never share. Returns the peers seen."""
    tracker, deadline = optimizer.tracker, get_dht_time() + timeout
    while (seen := tracker.global_progress.num_peers) < count and optimizer.local_epoch == 0:
        if get_dht_time() >= deadline:
            log.warning("start-up barrier: hivemind sees %d of %d peers after %.0f s; training anyway",
                        seen, count, timeout)
            break
        threading.Event().wait(0.2)
    return seen
