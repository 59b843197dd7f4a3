"""Swarm health: averaging rounds and their outcomes, weight fingerprints, drift and re-sync.

hivemind 1.1.12 (as pinned) learns a round's outcome in two places, both watched here without changing it:
- gradients: `Optimizer._begin_averaging_gradients` (no group could even start) and
  `Optimizer._average_gradients_and_load_into_optimizer` (its StepControl ends with the gathered peers or an error);
- parameters: the state averager's background thread only logs the outcome ("Averaged parameters with N peers",
  "Averaging failed with ..."): a logging handler on its logger reads it.
- DiLoCo's outer step (swarm/diloco.py) tells its `on_swarm_step` how each swarm step went.

And it keeps the peers one model: a peer re-syncs (downloads the swarm's state) when its gradient round failed or
came back incomplete, or when its fingerprint drifted from the others'; at train.max_swarm_steps the peers end
with a parameter round that holds them all (`final_round`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import hivemind
import torch
from pydantic import BaseModel, Field

from sdswarm.swarm.diloco import DiLoCoOptimizer, OuterStep
from sdswarm.swarm.validation import Refusal

log = logging.getLogger(__name__)

Outcome = Literal["complete", "partial", "failed", "alone"]
RECENT_ROUNDS = 8  # rounds each peer publishes to the swarm
FINGERPRINT_HISTORY = 4  # swarm steps of fingerprints each peer publishes, so peers find a step in common
DRIFT_CHECK_PERIOD = 5.0  # seconds between reads of the others' fingerprints (they publish every 5 s)
DRIFT_TOLERANCE = 3.0  # distance from the others, in swarm steps' worth of movement, that triggers a re-sync


class Round(BaseModel):
    """One averaging round (hivemind all-reduce) as this peer saw it."""

    kind: Literal["gradients", "parameters", "outer"]
    swarm_step: int  # the swarm step (hivemind's local_epoch) the round belongs to
    group_size: int = Field(ge=0, le=100_000)  # peers averaged with, this one included; 1 when alone or failed
    swarm_peers: int = Field(ge=0, le=100_000)  # peers hivemind's tracker saw when the round began
    outcome: Outcome  # partial: a group smaller than the swarm; alone: nobody else to average with
    bytes_sent: int = Field(ge=0)  # estimated: the tensors' size on the wire, butterfly all-reduce
    bytes_received: int = Field(ge=0)
    duration: float = Field(ge=0)  # seconds from the round's start to its outcome
    time: float = 0.0
    # peer id -> its parts this peer refused or clipped in the round (swarm/validation.py: NaN, 1e6x, ...)
    refused: dict[str, int] = Field(default_factory=dict, max_length=64)
    # the share of the vector no reducer returned (one failed or left): this peer kept its own values there
    missing: float = Field(0.0, ge=0, le=1)


def round_bytes(values: int, bytes_per_value: float, group_size: int) -> int:
    """Bytes one peer sends (and receives) in a butterfly all-reduce of `values` numbers among `group_size` peers:
    its share of the others' parts out, their averages back: 2 (n-1)/n of the tensor each way."""
    if group_size <= 1:
        return 0
    return int(2 * (group_size - 1) / group_size * values * bytes_per_value)


class RoundLog:
    """The rounds of this peer: a concise log line each, a record in metrics.jsonl, the recent ones for telemetry."""

    def __init__(self, metrics_path: Path | None, *, values: int, bytes_per_value: float) -> None:
        self.metrics_path, self.values, self.bytes_per_value = metrics_path, values, bytes_per_value
        self.recent: deque[Round] = deque(maxlen=RECENT_ROUNDS)
        self.counts: Counter[str] = Counter()  # "gradients complete": n, ...
        self.refused: Counter[str] = Counter()  # peer id -> its parts refused or clipped, all rounds
        self._lock = threading.Lock()

    def record(self, kind: str, *, swarm_step: int, group_size: int, swarm_peers: int, outcome: Outcome,
               duration: float, refusals: Sequence[Refusal] = (), missing: float = 0.0) -> Round:
        """Record one round; callable from any thread (the DiLoCo outer step's included). A round that gathered
        everyone but got back only part of the averages (`missing`) is partial."""
        if outcome == "complete" and missing > 0:
            outcome = "partial"
        size = round_bytes(self.values, self.bytes_per_value, group_size)
        refused = Counter()
        for refusal in refusals:
            refused[refusal.sender] += refusal.refused + refusal.clipped
        entry = Round(kind=kind, swarm_step=swarm_step, group_size=group_size, swarm_peers=swarm_peers,
                      outcome=outcome, bytes_sent=size, bytes_received=size, duration=max(duration, 0.0),
                      time=time.time(), refused=dict(refused.most_common(64)), missing=min(missing, 1.0))
        # Alone, a round is a no-op every step: recorded, not shown.
        level = logging.WARNING if outcome in ("failed", "partial") or refused else (
            logging.DEBUG if outcome == "alone" else logging.INFO)
        log.log(level, "averaging %s, swarm step %d: %s, %d of %d peers, %.1f s, %s each way%s%s", kind, swarm_step,
                outcome, group_size, swarm_peers, entry.duration, _megabytes(size),
                f"; {entry.missing:.0%} of the values came back without an average" if entry.missing else "",
                "".join(f"; {n} parts refused or clipped from peer {peer}" for peer, n in entry.refused.items()))
        with self._lock:
            self.recent.append(entry)
            self.counts[f"{kind} {outcome}"] += 1
            self.refused.update(refused)
        self.write({"round": entry.model_dump(exclude={"time"})})
        return entry

    def write(self, record: dict) -> None:
        """One line of metrics.jsonl (the trainer's lines have a "step"; these a "round" or a "swarm_step")."""
        if self.metrics_path is None:
            return
        with self._lock, open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": time.time(), **record}) + "\n")

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [r.model_dump() for r in self.recent]


class WeightFingerprint:
    """A few fixed random projections of the trainable weights: equal on peers that hold one model.

    The projections read a fixed random sample of coordinates (the same on every peer: drawn from the run seed),
    so a fingerprint costs a gather of `sample` values, not a pass over the model."""

    def __init__(self, params: Sequence[torch.Tensor], *, seed: int, sample: int = 4096, projections: int = 4):
        generator = torch.Generator().manual_seed(seed)
        sizes = torch.tensor([p.numel() for p in params])
        offsets = torch.cumsum(sizes, 0)
        picks = torch.randint(int(offsets[-1]), (sample,), generator=generator).sort().values
        owners = torch.bucketize(picks, offsets, right=True)
        starts = offsets - sizes
        self.params = list(params)
        self.picks = [(i, (picks[owners == i] - starts[i]).to(p.device)) for i, p in enumerate(params)
                      if (owners == i).any()]
        self.matrix = torch.randn(projections, sample, generator=generator) / math.sqrt(sample)

    @torch.no_grad()
    def __call__(self) -> list[float]:
        values = torch.cat([self.params[i].detach().reshape(-1)[idx].float().cpu() for i, idx in self.picks])
        return [round(float(v), 7) for v in self.matrix @ values]


class FingerprintEntry(BaseModel):
    swarm_step: int
    values: list[float] = Field(max_length=16)
    movement: float | None = None  # distance from this peer's fingerprint one swarm step earlier


def spread(fingerprints: dict[str, list[FingerprintEntry]]) -> tuple[int, float, dict[str, float]] | None:
    """Where the peers stand against each other at the latest swarm step they all published:
    (that step, the largest distance between two peers in swarm steps' worth of movement, each peer's distance
    from the others' median). None when fewer than two peers share a step."""
    by_step: dict[int, dict[str, FingerprintEntry]] = {}
    for peer, entries in fingerprints.items():
        for entry in entries:
            by_step.setdefault(entry.swarm_step, {})[peer] = entry
    shared = [step for step, peers in by_step.items() if len(peers) >= 2]
    if not shared:
        return None
    step = max(shared, key=lambda s: (len(by_step[s]), s))
    entries = by_step[step]
    moves = sorted(e.movement for e in entries.values() if e.movement)
    scale = moves[len(moves) // 2] if moves else None
    if not scale:
        return None
    vectors = {peer: torch.tensor(e.values, dtype=torch.float64) for peer, e in entries.items()}
    center = torch.stack(list(vectors.values())).median(dim=0).values
    distances = {peer: float((v - center).norm()) / scale for peer, v in vectors.items()}
    widest = max(float((a - b).norm()) for a in vectors.values() for b in vectors.values()) / scale
    return step, widest, distances


def finish_pending_rounds(optimizer: hivemind.Optimizer) -> None:
    """Wait for the parameter round hivemind runs in the background after a swarm step, and apply its result.

    Without this a peer that stops right after a swarm step (train.max_swarm_steps, a signal) saves the weights it had
    before the swarm averaged them: the round that would merge a peer's step on local gradients (after a failed
    gradient round) lands after the checkpoint, and the peers end as different models."""
    if not isinstance(optimizer, hivemind.Optimizer):  # DiLoCo's outer step is synchronous
        return
    averager = optimizer.state_averager
    if not averager.pending_updates:
        return
    log.info("waiting for the swarm's last parameter round before saving")
    averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)


class SwarmHealth:
    """Watches one hivemind.Optimizer: records its rounds, the gradient norm and a fingerprint per swarm step,
    and re-syncs this peer from the others when it has drifted away from them, or (`resync_after_failed_round`)
    when its gradient round failed or came back incomplete while others trained: hivemind would keep the step it
    made with its own gradient, and the peer would stay apart from the swarm until parameter rounds (which leave
    AdamW's moments apart) pull it back."""

    def __init__(self, optimizer: hivemind.Optimizer | DiLoCoOptimizer, rounds: RoundLog,
                 fingerprint: WeightFingerprint | None,
                 peer_fingerprints: Callable[[], dict[str, list[FingerprintEntry]]] | None = None, *,
                 resync_after_failed_round: bool = True, last_swarm_step: int | None = None) -> None:
        self.optimizer, self.rounds, self.fingerprint = optimizer, rounds, fingerprint
        self.peer_fingerprints = peer_fingerprints
        self.resync_after_failed_round = resync_after_failed_round
        self.last_swarm_step = last_swarm_step  # train.max_swarm_steps: there, final_round merges the peers
        self._resync_why: str | None = None  # set by this swarm step's gradient round, done after the step
        self.fingerprints: deque[FingerprintEntry] = deque(maxlen=FINGERPRINT_HISTORY)
        self.grad_norm: float | None = None
        self.spread: float | None = None  # the swarm's, in swarm steps' worth of movement
        self.resyncs = 0
        self._grad_started = time.perf_counter()
        self._grad_peers = 0
        self._state_round: tuple[float, int, int] | None = None  # start, swarm step, swarm peers
        self._drift_checked = -math.inf

    # --- hooks (hivemind 1.1.12) ---

    def attach(self) -> SwarmHealth:
        """Hook into hivemind.Optimizer, or DiLoCo's outer steps."""
        self._handler = None
        if isinstance(self.optimizer, DiLoCoOptimizer):
            self.optimizer.on_swarm_step = self._outer_step_done
            return self
        opt = self.optimizer
        opt._begin_averaging_gradients = self._wrap_begin(opt._begin_averaging_gradients)
        opt._average_gradients_and_load_into_optimizer = self._wrap_average(
            opt._average_gradients_and_load_into_optimizer)
        opt._update_global_epoch = self._wrap_update(opt._update_global_epoch)
        opt.state_averager.step = self._wrap_state_step(opt.state_averager.step)
        self._handler = _StateRoundHandler(self._state_round_done)
        logging.getLogger("hivemind.optim.state_averager").addHandler(self._handler)
        return self

    def detach(self) -> None:
        if self._handler is not None:
            logging.getLogger("hivemind.optim.state_averager").removeHandler(self._handler)

    def _swarm_peers(self) -> int:
        return max(int(self.optimizer.tracker.global_progress.num_peers), 1)

    def _wrap_begin(self, begin):
        @functools.wraps(begin)
        def wrapped(*args, **kwargs):
            self._grad_started, self._grad_peers = time.perf_counter(), self._swarm_peers()
            began = begin(*args, **kwargs)
            if not began:  # hivemind goes on with local gradients and never calls _average_gradients...
                outcome = "alone" if self._grad_peers <= 1 else "failed"
                self._record_gradients(outcome, 1)
            return began
        return wrapped

    def _wrap_average(self, average):
        @functools.wraps(average)
        def wrapped(control, *args, **kwargs):
            try:
                return average(control, *args, **kwargs)
            finally:
                if control is None:
                    self._record_gradients("alone", 1)
                elif control.done() and control.exception() is None:
                    group = len(control.result())
                    self._record_gradients("complete" if group >= self._grad_peers else "partial", group)
                else:
                    self._record_gradients("failed", 1)
        return wrapped

    def _record_gradients(self, outcome: Outcome, group: int) -> None:
        refusals, missing = _reports(self.optimizer.grad_averager)
        entry = self.rounds.record("gradients", swarm_step=self.optimizer.local_epoch, group_size=group,
                                   swarm_peers=self._grad_peers, outcome=outcome,
                                   duration=time.perf_counter() - self._grad_started, refusals=refusals,
                                   missing=missing)
        if self.resync_after_failed_round and self._grad_peers > 1 and (outcome == "failed" or entry.missing):
            self._resync_why = (f"its gradient round failed ({self._grad_peers} peers in the swarm)"
                                if outcome == "failed" else
                                f"{entry.missing:.0%} of its gradient round came back without the group's average")

    def _wrap_state_step(self, step):
        @functools.wraps(step)
        def wrapped(*args, **kwargs):
            if kwargs.get("averaging_round"):
                self._state_round = (time.perf_counter(), self.optimizer.local_epoch, self._swarm_peers())
            return step(*args, **kwargs)
        return wrapped

    def _state_round_done(self, group: int | None) -> None:
        if self._state_round is None:
            return
        started, swarm_step, peers = self._state_round
        self._state_round = None
        outcome = "failed" if group is None else ("complete" if group >= peers else "partial")
        refusals, missing = _reports(self.optimizer.state_averager)
        self.rounds.record("parameters", swarm_step=swarm_step, group_size=group or 1, swarm_peers=peers,
                           outcome=outcome, duration=time.perf_counter() - started, refusals=refusals,
                           missing=missing)

    def _outer_step_done(self, step: OuterStep) -> None:
        """DiLoCo: one averaging round of pseudo-gradients per swarm step; a missed one is a failed round (the peer
        downloaded the swarm's state instead of stepping)."""
        if step.outcome == "averaged":
            outcome: Outcome = "complete" if step.group_size >= step.swarm_peers else "partial"
        else:
            outcome = "alone" if step.outcome == "alone" else "failed"
        refusals, missing = _reports(self.optimizer.averager)
        self.rounds.record("outer", swarm_step=step.round_step, group_size=step.group_size,
                           swarm_peers=step.swarm_peers, outcome=outcome, duration=step.seconds, refusals=refusals,
                           missing=missing)
        self.after_swarm_step()

    def _wrap_update(self, update):
        @functools.wraps(update)
        def wrapped(*args, **kwargs):
            result = update(*args, **kwargs)
            self.after_swarm_step()
            return result
        return wrapped

    # --- after each swarm step (on the training thread) ---

    def after_swarm_step(self) -> None:
        inner = self.optimizer.inner if isinstance(self.optimizer, DiLoCoOptimizer) else self.optimizer.opt
        self.grad_norm = getattr(inner, "last_grad_norm", None)  # DiLoCo: of its last local step
        if self._resync_why is not None:
            why, self._resync_why = self._resync_why, None
            if self.last_swarm_step is not None and self.optimizer.local_epoch >= self.last_swarm_step:
                # the others may already be averaging their last weights with this peer's: a download now could
                # take a state from before that round
                log.warning("swarm step %d: %s; the swarm's last round merges it", self.optimizer.local_epoch, why)
            else:
                self.resync(f"{why}: loading the swarm's state instead of keeping this peer's own step")
        if self.fingerprint is None:
            return
        values = self.fingerprint()
        previous = self.fingerprints[-1] if self.fingerprints else None
        movement = None if previous is None else math.dist(values, previous.values)
        self.fingerprints.append(FingerprintEntry(swarm_step=self.optimizer.local_epoch, values=values,
                                                  movement=movement))
        self.rounds.write({"swarm_step": self.optimizer.local_epoch, "grad_norm": self.grad_norm,
                           "fingerprint": values})
        self._check_drift()

    def _check_drift(self) -> None:
        if self.peer_fingerprints is None or time.monotonic() - self._drift_checked < DRIFT_CHECK_PERIOD:
            return
        self._drift_checked = time.monotonic()
        me = str(self.optimizer.dht.peer_id)
        try:
            found = spread({**self.peer_fingerprints(), me: list(self.fingerprints)})
        except Exception as exc:  # the DHT is having trouble: check again after the next step
            log.debug("could not read the swarm's fingerprints: %s", exc)
            return
        if found is None:
            return
        swarm_step, self.spread, distances = found
        mine = distances.get(me)
        if mine is not None and len(distances) >= 3 and mine > DRIFT_TOLERANCE:
            self.resync(f"this peer drifted from the swarm ({mine:.1f} swarm steps' worth at step {swarm_step}): "
                        "loading the state from peers")

    def resync(self, why: str) -> None:
        step = self.optimizer.local_epoch
        log.warning("swarm step %d: %s", step, why)
        self.optimizer.load_state_from_peers()
        self.resyncs += 1
        self.fingerprints.clear()
        self.rounds.write({"resync": why, "from_swarm_step": step, "to_swarm_step": self.optimizer.local_epoch})

    def final_round(self, peers_here: Callable[[], int], timeout: float, stop: threading.Event) -> bool:
        """train.max_swarm_steps: average the weights once more with every peer still here, again until one round
        holds them all (they all are at the last step: nothing else competes for the group), so that the swarm's
        checkpoints and exports are one model even when its last rounds were partial. True when one did."""
        if not isinstance(self.optimizer, hivemind.Optimizer):  # DiLoCo: the outer step already is the last average
            return True
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline:
            expected = peers_here()
            if expected <= 1:
                return True
            self.optimizer.state_averager.step(averaging_round=True, delay_averaging=False,
                                               averaging_opts=dict(timeout=self.optimizer.averaging_timeout))
            last = self.rounds.recent[-1] if self.rounds.recent else None
            if last is not None and last.kind == "parameters" and last.group_size >= expected and not last.missing:
                log.info("the swarm ends as one model: the last weights were averaged with all %d peers", expected)
                if self.fingerprint is not None:  # the last step's fingerprint, now the swarm's
                    self.rounds.write({"swarm_step": self.optimizer.local_epoch, "grad_norm": self.grad_norm,
                                       "fingerprint": self.fingerprint(), "final": True})
                return True
        log.warning("ending without a last round that held every peer: this peer's weights may differ from theirs")
        return False

    def published(self) -> dict:
        """What this peer tells the swarm about its health (telemetry)."""
        return {"rounds": self.rounds.snapshot(), "grad_norm": self.grad_norm,
                "fingerprints": [f.model_dump() for f in self.fingerprints], "resyncs": self.resyncs}


class _StateRoundHandler(logging.Handler):
    """Reads the outcome of a parameter round from the state averager's log (the only place hivemind says it)."""

    DONE = re.compile(r"Averaged parameters with (\d+) peers")

    def __init__(self, done: Callable[[int | None], None]) -> None:
        super().__init__(logging.DEBUG)
        self.done = done

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if found := self.DONE.search(message):
                self.done(int(found.group(1)))
            elif message.startswith("Averaging failed with"):
                self.done(None)
        except Exception:  # a health record must never break hivemind
            log.debug("could not record a parameter round", exc_info=True)


def _reports(averager: object) -> tuple[list[Refusal], float]:
    """What a checked averager (swarm/validation.py) refused since it was last asked, and the share of a vector
    that came back without an average."""
    take = getattr(averager, "take_reports", None)
    return take() if take is not None else ([], 0.0)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 10_000 else f"{size} B"
