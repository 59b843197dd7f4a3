"""Whom a peer believes about the swarm's step, and whose state it takes when it catches up.

hivemind 1.1.12 believes any peer: its progress tracker takes the highest swarm step (epoch) any peer reports as
the swarm's, a peer that sees itself two steps behind downloads the state of the peer that declares the highest
priority (its epoch), and loads whatever comes, NaN included. One process reporting swarm step 1000 made a mother
throw its weights away (trust issue). Here:

- `TrustedProgressTracker` hears a peer's step only when the samples behind it can exist: at most one step past
  the step this peer trusts, plus what the swarm could have trained since that step began (this peer's own speed
  x the peers, x EPOCH_SLACK for faster peers). A peer starting up trusts the lower median of the others' steps
  (a joiner adopts the swarm's; one liar among honest peers does not move it); a peer alone, its own (a joiner
  that saw nobody at first hears the swarm's step once its own speed says the swarm could have got there).
- `CheckedStateAverager` downloads only from donors whose offered step is one the tracker trusts and that the
  `admitted` hook accepts (admission's, when it lands: swarm/admission.py), and checks the state before loading it:
  shapes, finite values, its step between this peer's and the swarm's, and the weights within MAX_STATE_CHANGE of
  this peer's (relative norm). A refused donor is logged by peer id, its progress is no longer heard, and the next
  donor is tried; with none left this peer trains on and tries again at its next step.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import deserialize_torch_tensor
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager, dump_optimizer_state
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MPFuture, ValueWithExpiration, get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming

from sdswarm.swarm.admission import Gate, GatedRPCs
from sdswarm.swarm.validation import CheckedAveraging, QuarantineBoard, lower_median

log = logging.getLogger(__name__)

EPOCH_SLACK = 4.0  # the swarm may train this many times faster than this peer's speed x the number of peers
MAX_STATE_CHANGE = 2.0  # a downloaded state's weights: at most this far from this peer's, relative to their norm
# hivemind looks at the swarm's progress again after half its estimate of the time left, but not sooner than 0.5 s:
# in the last second before a swarm step its estimate (what peers step on) could be 0.5 s old. A few more small DHT
# reads per swarm step, in that last second only.
MIN_REFRESH_PERIOD = 0.1
# and while this peer has no measured speed (at start, after the start-up barrier), this often at least, not at
# the 10 s an estimate built on no speed gives
UNMEASURED_REFRESH_PERIOD = 0.5


def peer_text(peer_id: bytes | PeerID) -> str:
    try:
        return str(peer_id if isinstance(peer_id, PeerID) else PeerID(peer_id))
    except Exception:
        return repr(peer_id)[:80]


class TrustedProgressTracker(ProgressTracker):
    """hivemind's progress tracker, hearing only the swarm steps the samples reported toward them can explain."""

    def __init__(self, *args, **kwargs) -> None:
        self.trusted_epoch: int | None = None  # set from the first view (hivemind reads one in __init__)
        self.trusted_since = 0.0
        self.distrusted: set[bytes] = set()  # peers whose state was refused: their progress is not heard
        self.ignored: dict[bytes, int] = {}  # peer -> the step last ignored (logged once per step)
        kwargs.setdefault("min_refresh_period", MIN_REFRESH_PERIOD)
        super().__init__(*args, **kwargs)

    def distrust(self, peer_id: PeerID) -> None:
        self.distrusted.add(peer_id.to_bytes())

    def _parse_swarm_progress_data(self, metadata: Any):
        if isinstance(metadata, dict) and metadata:
            metadata = self.with_own_progress(self.plausible(metadata))
        elif self.trusted_epoch is None:  # nobody else at start: this peer's own step is the swarm's
            self.trusted_epoch, self.trusted_since = self.local_progress.epoch, get_dht_time()
        progress = super()._parse_swarm_progress_data(metadata)
        if self.performance_ema.num_updates == 0:  # no speed measured yet: an estimate of the time left means nothing
            progress.next_fetch_time = min(progress.next_fetch_time, get_dht_time() + UNMEASURED_REFRESH_PERIOD)
        return progress

    def with_own_progress(self, metadata: dict) -> dict:
        """This peer's own record as it is now, not the DHT's copy. A read takes from milliseconds to seconds on a
        busy machine, and hivemind replaces its count with what the read returned: the samples this peer trained
        meanwhile dropped out of the count (measured: 16 of a 32-sample target), and the swarm trained past it."""
        own = metadata.get(self._local_public_key)
        if own is None:
            return metadata
        expiration = own.expiration_time if isinstance(own, ValueWithExpiration) else get_dht_time() + 60
        return {**metadata, self._local_public_key: ValueWithExpiration(self.local_progress.dict(), expiration)}

    def plausible(self, metadata: dict) -> dict:
        """The progress records whose swarm step this peer can believe (see the module's docstring)."""
        entries = []
        for key, item in metadata.items():
            value = item.value if isinstance(item, ValueWithExpiration) else None
            try:
                entries.append((key, item, LocalTrainingProgress.parse_obj(value) if value is not None else None))
            except Exception:  # hivemind's schema validator lets only valid records in; skip the odd one
                continue
        others = [p for key, _, p in entries if p is not None and key != self._local_public_key
                  and p.peer_id not in self.distrusted]
        now, local = get_dht_time(), self.local_progress.epoch
        if self.trusted_epoch is None:
            steps = [p.epoch for p in others if not p.client_mode] or [p.epoch for p in others]
            self.trusted_epoch, self.trusted_since = max(local, lower_median(steps)) if steps else local, now
        if local > self.trusted_epoch:
            self.trusted_epoch, self.trusted_since = local, now
        rate = self.performance_ema.samples_per_second * (len(others) + 1)
        ceiling = self.trusted_epoch + 1 + int(
            EPOCH_SLACK * max(now - self.trusted_since, 0.0) * rate / max(self.target_batch_size, 1))
        kept = {}
        for key, item, progress in entries:
            if progress is not None and progress.peer_id in self.distrusted:
                continue
            if progress is not None and progress.epoch > ceiling:
                if self.ignored.get(progress.peer_id) != progress.epoch:
                    self.ignored[progress.peer_id] = progress.epoch
                    log.warning("ignoring peer %s's swarm step %d: this peer trusts step %d, and the swarm cannot "
                                "have trained past step %d since (%d samples per step)", peer_text(progress.peer_id),
                                progress.epoch, self.trusted_epoch, ceiling, self.target_batch_size)
                continue
            kept[key] = item
        heard = [p.epoch for key, _, p in entries if p is not None and key in kept and not p.client_mode]
        if heard and max(heard) > self.trusted_epoch:
            self.trusted_epoch, self.trusted_since = max(heard), now
        return kept


def forget_throughput(tracker: ProgressTracker) -> None:
    """Start the tracker's samples-per-second estimate afresh at the next batch, and look at the swarm's progress
    again soon. hivemind's estimate is an average over intervals between batches, and one interval that held a wait
    (the start-up barrier, a pause from the UI) keeps it far too low for dozens of batches: the tracker then expects
    the target minutes later, looks only every 10 s, and trains on alone past it (measured: 2.8x the target at the
    first swarm step)."""
    ema = tracker.performance_ema
    ema.samples_per_second, ema.ema_seconds_per_sample, ema.num_updates = ema.eps, 0.0, 0
    ema.reset_timer()
    progress = tracker.global_progress
    progress.next_fetch_time = min(progress.next_fetch_time, get_dht_time() + UNMEASURED_REFRESH_PERIOD)
    tracker.global_state_updated.set()  # its fetcher waits until the time it had set: wake it to wait until this one


# the longest wait for the next part of a state download: a donor compresses each tensor as it sends it (SD 1.5's
# largest is 13 M values), on a machine that trains meanwhile; the whole download is bounded by load_state_timeout
CHUNK_TIMEOUT = 30.0
PROGRESS_EVERY = 30.0  # seconds between a state download's progress lines (SD 1.5's UNet: minutes at 100 Mbit/s)


class DownloadProgress:
    """What a state download has received, of the bytes expected (swarm/costs.py's estimate), and at what rate."""

    def __init__(self, donor: PeerID, expected: int | None, every: float = PROGRESS_EVERY) -> None:
        self.donor, self.expected, self.every = donor, expected, every
        self.received = 0
        self.started = self.logged = time.monotonic()

    def add(self, num_bytes: int) -> None:
        self.received += num_bytes
        now = time.monotonic()
        if now - self.logged >= self.every:
            self.logged = now
            log.info("downloading the state from peer %s: %s", self.donor, self.describe(now))

    def describe(self, now: float | None = None) -> str:
        seconds = max((time.monotonic() if now is None else now) - self.started, 1e-9)
        text = f"{self.received / 1e6:.1f} MB"
        if self.expected:
            text += f" of about {self.expected / 1e6:.1f} MB ({min(self.received / self.expected, 1.0):.0%})"
        return f"{text} in {seconds:.0f} s, {self.received * 8 / 1e6 / seconds:.1f} Mbit/s"


class CheckedDownloads(DecentralizedAverager):
    """Mixin placed under TrainingStateAverager (whose load_state_from_peers calls this one's): the download,
    donor by donor, each state checked by `state_problem` before it is handed on."""

    def __init__(self, *args, **kwargs) -> None:
        self.epoch_ceiling: Callable[[], int] | None = None  # the swarm step the tracker trusts, plus one
        self.expected_bytes: int | None = None  # what a download brings (swarm/costs.py), for its progress lines
        self.admitted: Callable[[PeerID], bool] = lambda peer: True  # admission's hook: may this peer be a donor?
        self.on_refused: Callable[[PeerID], None] = lambda peer: None
        self.refused_donors: set[PeerID] = set()
        super().__init__(*args, **kwargs)

    def state_problem(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> str | None:
        raise NotImplementedError

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None):
        """The first donor's state that passes the checks, as (metadata, tensors); None when no donor's does."""
        assert wait, "the checked download always waits"
        for donor in self.donors():
            started = time.monotonic()
            try:
                state = self._download_from(donor, timeout)
            except Exception as exc:
                log.warning("downloading the state from peer %s failed: %r", donor, exc)
                continue
            if state is None:
                continue
            seconds, size = time.monotonic() - started, state[1].num_bytes
            problem = self.state_problem(*state)
            if problem is None:
                log.info("downloaded the state from peer %s: %.1f MB in %.1f s (%.1f Mbit/s), checked", donor,
                         size / 1e6, seconds, size * 8 / 1e6 / max(seconds, 1e-9))
                return state
            log.warning("refused the state offered by peer %s: %s; this peer keeps its own and tries another peer",
                        donor, problem)
            self.refused_donors.add(donor)
            self.on_refused(donor)
        return None

    def donors(self) -> list[PeerID]:
        """Peers offering their state, highest priority (swarm step) first, without those this peer cannot take."""
        found = self.dht.get(f"{self.prefix}.all_averagers", latest=True)
        offers = found.value if isinstance(found, ValueWithExpiration) and isinstance(found.value, dict) else {}
        ceiling = self.epoch_ceiling() if self.epoch_ceiling is not None else math.inf
        ranked = []
        for key, item in offers.items():
            priority = item.value if isinstance(item, ValueWithExpiration) else None
            if not isinstance(priority, (int, float)) or isinstance(priority, bool):
                continue
            try:
                peer = PeerID(key)
            except Exception:
                continue
            if peer == self.peer_id or peer in self.refused_donors or not self.admitted(peer):
                continue
            if priority > ceiling:
                log.warning("not downloading from peer %s: it offers swarm step %s, the swarm is at %d", peer,
                            priority, ceiling - 1)
                continue
            ranked.append((float(priority), random.random(), peer))
        return [peer for _, _, peer in sorted(ranked, reverse=True)]

    def _download_from(self, donor: PeerID, timeout: float | None) -> tuple[Any, PackedTensors] | None:
        future = MPFuture()
        self._outer_pipe.send(("_download_state_from", [], dict(donor=donor.to_bytes(), timeout=timeout,
                                                                expected=self.expected_bytes, future=future)))
        state = future.result(timeout=timeout)
        return None if state is None else (state[0], PackedTensors(state[1]))

    async def _download_state_from(self, donor: bytes, future: MPFuture, timeout: float | None = None,
                                   expected: int | None = None) -> None:
        """In the averager's process: one donor's (metadata, tensors as they came: serialized, compressed), or None;
        as hivemind 1.1.12's DecentralizedAverager._load_state_from_peers does for each donor it tries, with a
        progress line every PROGRESS_EVERY seconds."""
        if timeout is not None:  # hivemind's per-chunk wait is the averager's request_timeout (a second or three)
            timeout = max(self.next_chunk_timeout or self.request_timeout, CHUNK_TIMEOUT)
        try:
            stub = self.get_stub(self._p2p, PeerID(donor), namespace=self.prefix)
            stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
            metadata, parts, tensors = None, [], []
            progress = DownloadProgress(PeerID(donor), expected)
            async for message in aiter_with_timeout(stream, timeout=timeout):
                progress.add(len(message.tensor_part.buffer))
                if message.metadata:
                    metadata = self.serializer.loads(message.metadata)
                if message.tensor_part.dtype and parts:
                    tensors.append(combine_from_streaming(parts).SerializeToString())
                    parts = []
                parts.append(message.tensor_part)
            if parts:
                tensors.append(combine_from_streaming(parts).SerializeToString())
            future.set_result((metadata, tensors) if metadata else None)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise


class PackedTensors(Sequence[torch.Tensor]):
    """A downloaded state as it came over the wire (compressed: fp16 weights, 8-bit moments, about 4 bytes per
    parameter), each tensor decompressed only when read (checked, then copied into place, one at a time): the
    state is never held whole in fp32 beside this peer's own (12 bytes per parameter more)."""

    def __init__(self, messages: Sequence[bytes]) -> None:
        self.messages = messages

    def __len__(self) -> int:
        return len(self.messages)

    @property
    def num_bytes(self) -> int:
        return sum(len(message) for message in self.messages)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PackedTensors(self.messages[index])
        return deserialize_torch_tensor(runtime_pb2.Tensor.FromString(self.messages[index]))


class CheckedStateAverager(GatedRPCs, CheckedAveraging, TrainingStateAverager, CheckedDownloads):
    """hivemind's training state averager: its rounds checked (swarm/validation.py), its downloads checked here."""

    refusal_kind = "parameters"

    def state_problem(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> str | None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return state_problem(metadata, tensors, params=params,
                             others=[*self.extra_tensors, *dump_optimizer_state(self.optimizer)[1]],
                             local_epoch=self.local_epoch,
                             ceiling=self.epoch_ceiling() if self.epoch_ceiling is not None else None)


def state_problem(metadata: Any, tensors: Sequence[torch.Tensor], *, params: Sequence[torch.Tensor],
                  others: Sequence[torch.Tensor], local_epoch: int, ceiling: int | None) -> str | None:
    """Why a downloaded state (hivemind's layout: the weights, then `others`, extras and optimizer statistics)
    must not replace this peer's, or None."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("epoch"), int):
        return "its metadata has no swarm step"
    epoch = metadata["epoch"]
    if epoch < local_epoch:
        return f"its swarm step {epoch} is behind this peer's {local_epoch}"
    if ceiling is not None and epoch > ceiling:
        return f"its swarm step {epoch} is beyond the swarm's {ceiling - 1}"
    local = [*params, *others]
    if len(tensors) != len(local):
        return f"{len(tensors)} tensors, this peer has {len(local)}"
    moved = size = 0.0  # |loaded - local|^2 and |local|^2 over the weights
    for i, (mine, theirs) in enumerate(zip(local, tensors, strict=True)):  # one read of each: they decompress
        if mine.shape != theirs.shape:
            return f"tensor {i} has shape {tuple(theirs.shape)}, this peer's {tuple(mine.shape)}"
        if not bool(torch.isfinite(theirs).all()):
            return f"tensor {i} holds non-finite values"
        if i < len(params):
            with torch.no_grad():
                moved += float((theirs.double() - mine.detach().to(theirs.device).double()).square().sum())
                size += float(mine.detach().double().square().sum())
    change = math.sqrt(moved) / max(math.sqrt(size), 1e-12)
    if change > MAX_STATE_CHANGE:
        return (f"its weights are {change:.3g}x their norm away from this peer's (at most {MAX_STATE_CHANGE}: "
                "no swarm moves that far)")
    return None


class GuardedOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer with the trusted tracker, the checked state averager and (through make_optimizer's
    grad_averager_factory) the checked gradient averager; `gate`: who may join its rounds and download its state
    (swarm/admission.py; None: anyone)."""

    def __init__(self, *, gate: Gate | None = None, quarantines: QuarantineBoard | None = None, **kwargs) -> None:
        self._gate = gate  # before hivemind.Optimizer makes its state averager
        self._quarantines = quarantines if quarantines is not None else QuarantineBoard(seats=1)
        super().__init__(**kwargs)

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        return TrustedProgressTracker(dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size,
                                      client_mode=self.client_mode, status_loglevel=self.status_loglevel,
                                      start=True, **kwargs)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        averager = CheckedStateAverager(
            dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=True, gate=self._gate,
            quarantine=self._quarantines.quarantine(), **kwargs)
        trust(averager, self.tracker)
        return averager


def trust(averager: CheckedDownloads, tracker: TrustedProgressTracker) -> None:
    """Downloads follow the tracker's trusted swarm step; a refused donor's progress is no longer heard."""
    averager.epoch_ceiling = lambda: tracker.global_epoch + 1
    averager.on_refused = tracker.distrust
