"""What each peer tells the swarm about itself, through the DHT; and the swarm as any node sees it."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.p2p import PeerID
from hivemind.utils import MPFuture, get_dht_time
from hivemind.utils.crypto import RSAPublicKey
from pydantic import BaseModel, Field, ValidationError
from pydantic import v1 as pydantic_v1

from sdswarm.swarm.catch_up import forget_throughput
from sdswarm.swarm.health import FINGERPRINT_HISTORY, RECENT_ROUNDS, FingerprintEntry, Round, spread

log = logging.getLogger(__name__)

EXPIRATION = 60.0  # a peer that stops publishing drops out of the view after this long
PERIOD = 5.0  # seconds between a peer's metrics
GONE_AFTER = 3 * PERIOD  # a peer silent for this long is shown as gone and no longer counted
# the longest one DHT call of telemetry may take: hivemind can lose a call's task (seen around a peer's restart,
# "Task was destroyed but it is pending"), and a caller waiting without a bound would then wait forever
DHT_TIMEOUT = 15.0


class PeerMetrics(BaseModel):
    peer_id: str = Field(max_length=128)
    role: Literal["mother", "relay", "client"]
    state: Literal["starting", "training", "stopped"] = "training"
    address: str | None = Field(None, max_length=256)  # the join address (host:port of its I.E endpoint) for relays
    step: int = 0
    samples_seen: int = 0
    loss: float | None = None  # smoothed
    samples_per_second: float = 0.0
    local_epoch: int = 0  # the swarm step its weights are at (hivemind's name, as every peer reads it)
    data_slot: int | None = None  # its slot in the shard plan (data/shards.py); None until chosen
    grad_norm: float | None = None  # the averaged gradient's norm at its last swarm step, before clipping
    rounds: list[Round] = Field(default_factory=list, max_length=RECENT_ROUNDS)  # its latest averaging rounds
    fingerprints: list[FingerprintEntry] = Field(default_factory=list, max_length=FINGERPRINT_HISTORY)
    resyncs: int = 0  # times it re-loaded the state from peers (drifted away, or its gradient round failed)
    # LoRA swarms: the base model its adapters belong to (model/lora.py: BaseIdentity); a peer reaching the swarm
    # through the DHT alone compares its own with these
    base_model: str | None = Field(None, max_length=256)
    base_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    time: float = 0.0
    gone: bool = False  # set by the reader: silent for GONE_AFTER seconds


class SwarmView(BaseModel):
    """The swarm's state as this node sees it: what `sdswarm status` prints and the dashboard shows."""

    run_id: str
    epoch: int  # the newest swarm step any peer reports (hivemind's global epoch; the I.E answer's field name)
    samples_toward_target: int  # at most the target: what is past it goes into a step that is due already
    target_batch_size: int
    progress: float = 0.0  # samples_toward_target / target_batch_size, never above 1
    samples_per_second: float  # of the live peers
    spread: float | None = None  # how far apart the peers' weights are, in swarm steps' worth of movement
    spread_step: int | None = None  # the swarm step that spread was measured at
    peers: list[PeerMetrics]


class SwarmRecords(pydantic_v1.BaseModel):
    """The DHT records telemetry keeps (hivemind's SchemaValidator, prefix run_id), as hivemind's ALBERT example
    keeps its metrics: each peer writes only its own subkey, hivemind's [owner:KEY] marker of its identity key, and
    signs the value with that key (RSASignatureValidator); a record another key signed is refused by the DHT."""

    sdswarm_metrics: dict[BytesWithPublicKey, dict]  # PeerMetrics (its data slot among them)
    sdswarm_barrier: dict[BytesWithPublicKey, pydantic_v1.StrictFloat]  # when it reached the start-up barrier


def records_validator(run_id: str) -> SchemaValidator:
    return SchemaValidator(SwarmRecords, prefix=run_id)


def owner_peer_id(subkey: Any) -> str | None:
    """The peer id of a signed record's owner (its [owner:KEY] subkey); None for a subkey that names no owner."""
    from sdswarm.swarm.invites import peer_id_of

    keys = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey) if isinstance(subkey, bytes) else []
    try:
        return peer_id_of(RSAPublicKey.from_bytes(keys[0])) if len(keys) == 1 else None
    except ValueError:
        return None


def metrics_key(run_id: str) -> str:
    return f"{run_id}_sdswarm_metrics"


def publish(dht: hivemind.DHT, run_id: str, metrics: PeerMetrics, owner: bytes) -> None:
    """`owner`: this peer's [owner:KEY] marker (Admission.owner); the DHT signs the record with its identity."""
    bounded(dht.store(metrics_key(run_id), subkey=owner, value=metrics.model_dump(),
                      expiration_time=get_dht_time() + EXPIRATION, return_future=True))


def bounded(future: MPFuture, timeout: float | None = None) -> Any:
    """The result of a DHT call, or TimeoutError after `timeout` (default DHT_TIMEOUT) seconds; the call is then
    cancelled."""
    try:
        return future.result(timeout=DHT_TIMEOUT if timeout is None else timeout)
    except TimeoutError:
        future.cancel()
        raise


def read_peers(dht: hivemind.DHT, run_id: str) -> list[PeerMetrics]:
    """The metrics the live peers publish (one DHT lookup): only each signer's own (a record that names another
    peer than the one that signed it is a forgery, and ignored)."""
    peers = []
    for subkey, entry in _entries(dht, metrics_key(run_id)):
        signer = owner_peer_id(subkey)
        try:
            metrics = PeerMetrics.model_validate(entry)
        except ValidationError:
            log.debug("ignoring malformed metrics from %s", signer)  # a peer's word is never trusted blindly
            continue
        if metrics.peer_id != signer:
            _warn_once(f"ignoring metrics that claim to be peer {metrics.peer_id} but were signed by peer {signer}")
            continue
        peers.append(metrics)
    return peers


_warned: dict[str, float] = {}


def _warn_once(message: str, every: float = 60.0) -> None:
    now = time.monotonic()
    if now - _warned.get(message, -every) >= every:
        _warned[message] = now
        log.warning(message)


def read_swarm(dht: hivemind.DHT, run_id: str, target_batch_size: int) -> SwarmView:
    now = get_dht_time()
    peers = read_peers(dht, run_id)
    for peer in peers:
        peer.gone = now - peer.time > GONE_AFTER
    gone = {peer.peer_id for peer in peers if peer.gone}
    live = [peer for peer in peers if not peer.gone]
    progress = [entry for _, entry in _entries(dht, f"{run_id}_progress")
                if isinstance(entry, dict) and _progress_peer(entry) not in gone]
    epochs = [int(p.get("epoch", 0)) for p in progress if isinstance(p.get("epoch"), int)]
    epoch = max(epochs, default=max((p.local_epoch for p in live), default=0))
    toward = sum(int(p.get("samples_accumulated", 0)) for p in progress
                 if p.get("epoch") == epoch and isinstance(p.get("samples_accumulated"), int))
    toward = max(0, min(toward, target_batch_size))
    rate = sum(p.samples_per_second for p in live if p.state == "training" and math.isfinite(p.samples_per_second))
    spread_step, width, _ = spread({p.peer_id: p.fingerprints for p in live}) or (None, None, None)
    return SwarmView(run_id=run_id, epoch=epoch, samples_toward_target=toward, target_batch_size=target_batch_size,
                     progress=toward / target_batch_size, samples_per_second=rate,
                     spread=None if width is None else round(width, 3), spread_step=spread_step,
                     peers=sorted(peers, key=lambda p: (p.gone, p.peer_id)))


def read_fingerprints(dht: hivemind.DHT, run_id: str) -> dict[str, list[FingerprintEntry]]:
    """The weight fingerprints the live peers publish, by peer id."""
    now = get_dht_time()
    return {p.peer_id: p.fingerprints for p in read_peers(dht, run_id) if now - p.time <= GONE_AFTER}


def _progress_peer(entry: dict) -> str | None:
    """The peer id of a hivemind progress record (bytes), as telemetry names it."""
    try:
        return PeerID(entry["peer_id"]).to_base58()
    except Exception:
        return None


def _entries(dht: hivemind.DHT, key: str) -> list[tuple[Any, Any]]:
    found = bounded(dht.get(key, latest=True, return_future=True))
    if found is None or not isinstance(found.value, dict):
        return []
    return [(subkey, item.value) for subkey, item in found.value.items() if item is not None]


class Publisher(threading.Thread):
    """Publishes this peer's metrics every `period` seconds until stopped."""

    def __init__(self, dht: hivemind.DHT, run_id: str, snapshot: Callable[[], PeerMetrics], owner: bytes,
                 period: float = PERIOD, after: Callable[[], None] | None = None):
        super().__init__(name="telemetry", daemon=True)
        self.dht, self.run_id, self.snapshot, self.owner, self.period = dht, run_id, snapshot, owner, period
        self.after = after  # called after each publication (e.g. remembering the peers)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                publish(self.dht, self.run_id, self.snapshot(), self.owner)
                if self.after is not None:
                    self.after()
            except Exception as exc:  # telemetry must never take training down
                log.debug("could not publish metrics: %s", exc)
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=self.period + 5)


def wait_for_peers(dht: hivemind.DHT, run_id: str, owner: bytes, count: int, timeout: float) -> int:
    """Start-up barrier: wait until `count` peers have announced themselves, so the first swarm step is shared.

    Without it, the first peer up makes swarm step 0 alone and the others start out of sync.
    Returns how many peers were seen; going on after the timeout with fewer is logged, not fatal. Each peer's entry is
    signed (its `owner` subkey): one peer counts once, and cannot enter others.
    """
    key, deadline = f"{run_id}_sdswarm_barrier", get_dht_time() + timeout
    seen = 0
    while True:
        bounded(dht.store(key, subkey=owner, value=get_dht_time(), expiration_time=get_dht_time() + max(timeout, 60.0),
                          return_future=True))
        seen = len({owner_peer_id(subkey) for subkey, _ in _entries(dht, key)} - {None})
        if seen >= count:
            return seen
        if get_dht_time() >= deadline:
            log.warning("start-up barrier: %d of %d peers after %.0f s; training anyway", seen, count, timeout)
            return seen
        log.info("start-up barrier: %d of %d peers here, waiting", seen, count)
        threading.Event().wait(1.0)


def wait_for_progress_from(optimizer: hivemind.Optimizer, count: int, timeout: float) -> int:
    """Second half of the start-up barrier, after this peer's first local step: wait until `count` peers (this one
    included) have reported the samples of a first step, and this peer's tracker counts them.

    hivemind's progress tracker hears of a peer only once it has reported samples, and looks again only every
    few seconds. Without this wait a fast peer can reach the target batch on its own samples before it sees the
    others, and its first swarm step is a local step that the others never share; and a slow peer (a mother that
    also serves its relay) whose tracker looks late finds the others' first swarm step made without it, and trails
    them by one from then on. Returns the peers seen."""
    tracker, deadline, me = optimizer.tracker, get_dht_time() + timeout, str(optimizer.dht.peer_id)
    seen = 1
    while optimizer.local_epoch == 0:
        try:
            started = {peer for peer, record in progress_records(optimizer).items()
                       if _positive(record.get("samples_accumulated")) or _positive(record.get("epoch"))}
            seen = len(started | {me})
        except Exception as exc:  # the DHT is having trouble: the tracker's count alone
            log.debug("could not read the swarm's progress: %s", exc)
            seen = tracker.global_progress.num_peers
        if seen >= count and tracker.global_progress.num_peers >= count:
            break
        if get_dht_time() >= deadline:
            log.warning("start-up barrier: %d of %d peers have trained a first step after %.0f s; training anyway",
                        seen, count, timeout)
            break
        tracker.global_progress.next_fetch_time = 0.0  # look now, not at hivemind's next refresh
        tracker.global_state_updated.set()
        threading.Event().wait(0.5)
    forget_throughput(tracker)  # the wait is not this peer's speed
    return seen


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def progress_records(optimizer: hivemind.Optimizer) -> dict[str, dict]:
    """hivemind's progress record of each peer (this one included), by peer id, those with a swarm step only; a
    departed peer's tracker removes its record, a killed one's expires."""
    return {peer: entry for _, entry in _entries(optimizer.dht, optimizer.tracker.training_progress_key)
            if isinstance(entry, dict) and (peer := _progress_peer(entry)) is not None
            and isinstance(entry.get("epoch"), int)}


def wait_for_stragglers(optimizer: hivemind.Optimizer, timeout: float, stop: threading.Event) -> int:
    """After the swarm's last step (train.max_swarm_steps): stay up while other peers are still before it, so that
    their last gradient round still finds this peer's averagers and a peer whose round failed can download the state
    the others ended with. Without it the fast peers leave mid-round and the last one ends as another model. Returns
    the peers still behind when it stopped waiting."""
    me = str(optimizer.dht.peer_id)
    deadline, said = time.monotonic() + timeout, False
    while True:
        try:
            behind = {peer for peer, record in progress_records(optimizer).items()
                      if peer != me and record["epoch"] < optimizer.local_epoch}
        except Exception as exc:  # the DHT is having trouble: nobody to wait for that we could see
            log.debug("could not read the swarm's progress: %s", exc)
            return 0
        if not behind or stop.is_set():
            return len(behind)
        if time.monotonic() >= deadline:
            log.warning("%d peers still had not reached swarm step %d after %.0f s; leaving", len(behind),
                        optimizer.local_epoch, timeout)
            return len(behind)
        if not said:
            log.info("staying up to %.0f s while %d peers finish swarm step %d (their last round needs this peer)",
                     timeout, len(behind), optimizer.local_epoch)
            said = True
        stop.wait(1.0)
