"""DiLoCo on hivemind (`swarm.sync: local_steps`): each peer takes about H AdamW steps alone, then the swarm
averages what the peers learned and takes one outer step together.

Every peer holds two copies of the trainable weights: the model's (the *local* weights, which its own AdamW
trains; that optimizer's state never leaves the peer) and, in host memory, the *global* weights the swarm
agrees on. A swarm step (hivemind's epoch) happens when the swarm has trained about `local_steps` batches per
peer: hivemind's progress tracker counts the samples toward `local_steps x batch x peers`, so all peers see the
target reached within a tracker refresh of each other and meet in one averaging round. There every peer sends
its pseudo-gradient (global - local weights, 8-bit by default) weighted by the samples it trained; each applies
the same outer step, SGD with Nesterov momentum, to the global weights and restarts from them. A round costs one
compressed copy of the trainable weights each way instead of two fp16 rounds per swarm step.

Built as OpenDiLoCo builds it (PrimeIntellect-ai/OpenDiloco, open_diloco/hivemind_diloco.py): the global weights
are hivemind's offloaded optimizer copy in a `TrainingStateAverager` whose optimizer is the outer SGD, and their
`.grad` buffers are the pseudo-gradients that a `DecentralizedAverager` averages. It is not a hivemind.Optimizer
subclass (OpenDiLoCo overrides most of its methods): this class drives the same hivemind parts directly. What a
late joiner downloads is that state averager's: the global weights and the outer momentum (fp16 + 8-bit).

A peer that misses a round (its group failed, or the others stepped without it) does not step alone, which
would leave its global weights apart from the swarm's for good: it downloads the swarm's state and starts a new
local phase from it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import hivemind
import torch
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.compression import CompressionBase, CompressionInfo, TensorRole
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from sdswarm.swarm.admission import Gate
from sdswarm.swarm.catch_up import CheckedStateAverager, TrustedProgressTracker, trust
from sdswarm.swarm.host_memory import mapped_copy, share_before_fork
from sdswarm.swarm.validation import CheckedDecentralizedAverager, QuarantineBoard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OuterStep:
    """How a swarm step went, for logs and health records."""

    swarm_step: int  # the swarm step this peer is at afterwards (hivemind's local_epoch)
    outcome: Literal["averaged", "alone", "missed"]  # alone: no other peer in the swarm; missed: state downloaded
    group_size: int  # peers whose pseudo-gradients were averaged (1 when alone)
    swarm_peers: int  # peers hivemind's tracker saw when the swarm step began
    round_step: int  # the swarm step the peers' round was for (local_epoch before it; the round's gather key)
    local_steps: int  # AdamW steps this peer took since the last swarm step
    seconds: float  # from reaching the target to training on


def outer_sgd(params, *, lr: float, momentum: float, shared: bool = False, folder: Path | None = None
              ) -> torch.optim.SGD:
    """The outer optimizer, with its momentum buffers made up front: zeros give the same first step as none
    (buffer = gradient), and a downloadable state of fixed size from the start. `shared`: in shared memory, or with
    `folder` in file mappings there (host_memory.py)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if momentum > 0:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if folder is not None:
                    zeros = mapped_copy(folder, torch.zeros(()), param.shape)
                else:
                    zeros = torch.zeros_like(param).share_memory_() if shared else torch.zeros_like(param)
                optimizer.state[param]["momentum_buffer"] = zeros
    return optimizer


class InPlaceStateAverager(CheckedStateAverager):
    """TrainingStateAverager for a CPU-only peer: the global weights' `.grad` is the model's `.grad` (the pseudo-
    gradient's buffer) from the start, and with `folder` the global weights live in file mappings there."""

    def __init__(self, *, folder: Path | None, **kwargs) -> None:
        self.folder = folder
        super().__init__(**kwargs)

    def _make_host_tensor(self, source_tensor: torch.Tensor, force_copy: bool = False) -> torch.Tensor:
        if not force_copy or self.folder is None:
            host = super()._make_host_tensor(source_tensor, force_copy)
        else:
            host = mapped_copy(self.folder, source_tensor).requires_grad_(source_tensor.requires_grad)
        if force_copy:  # before hivemind would make a zero .grad for it (a private copy its forked child keeps)
            host.grad = source_tensor.grad
        return host


class DiLoCoOptimizer:
    """Looks to the trainer like hivemind.Optimizer: step() after each backward pass, `local_epoch` counts swarm
    steps, `tracker` is hivemind's progress tracker. `last_outer_step` says how the latest swarm step went, and
    `on_swarm_step` (when set, e.g. by swarm/health.py) is told each one on the training thread."""

    def __init__(
        self,
        *,
        dht: hivemind.DHT,
        run_id: str,
        params: Sequence[torch.nn.Parameter],
        inner_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
        local_steps: int,
        batch_size_per_step: int,
        outer_lr: float,
        outer_momentum: float,
        compression: CompressionBase,
        state_compression: CompressionBase,
        matchmaking_time: float,
        averaging_timeout: float,
        allreduce_timeout: float,
        load_state_timeout: float,
        download_bytes: int = 0,
        client_mode: bool = False,
        in_place: bool = False,
        mapped_state_dir: Path | None = None,
        verbose: bool = True,
        private_key: RSAPrivateKey | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.dht, self.params = dht, list(params)
        self.in_place = in_place
        if in_place:  # a CPU-only peer: one .grad buffer per parameter for the whole run, pseudo-gradients included
            share_before_fork(self.params)
        self.inner = inner_optimizer(self.params)
        self.local_steps, self.batch_size_per_step = local_steps, batch_size_per_step
        self.matchmaking_time, self.averaging_timeout = matchmaking_time, averaging_timeout
        self.load_state_timeout, self.download_bytes = load_state_timeout, download_bytes
        self.client_mode = client_mode
        loglevel = logging.INFO if verbose else logging.DEBUG
        # the key the DHT signs this peer's records with; else its own (hivemind's default is one per process):
        # peers in one process stay apart (tests)
        self.tracker = TrustedProgressTracker(
            dht=dht, prefix=run_id, target_batch_size=local_steps * batch_size_per_step, client_mode=client_mode,
            status_loglevel=loglevel, private_key=private_key or RSAPrivateKey(), start=True)
        # the global weights (host copy, fp32) with the outer SGD on them; serves and loads the joiner's download.
        # mapped_state_dir: they and the outer momentum in file mappings there (touched once per swarm step, so a
        # CPU-only peer's memory holds what it trains with: local weights, .grad, AdamW's moments)
        if mapped_state_dir is not None:
            Path(mapped_state_dir).mkdir(parents=True, exist_ok=True)
        averager_class, layout = ((InPlaceStateAverager, {"folder": mapped_state_dir}) if in_place
                                  else (CheckedStateAverager, {}))
        quarantines = QuarantineBoard(seats=2)  # the state's averager and the outer rounds' keep the same peers out
        self.state_averager = averager_class(
            dht=dht, prefix=f"{run_id}_diloco_state", params=self.params, **layout, quarantine=quarantines.quarantine(),
            optimizer=lambda p: outer_sgd(p, lr=outer_lr, momentum=outer_momentum, shared=in_place,
                                          folder=mapped_state_dir if in_place else None),
            offload_optimizer=True, custom_gradients=True, state_compression=state_compression,
            min_matchmaking_time=matchmaking_time, allreduce_timeout=allreduce_timeout, next_chunk_timeout=None,
            client_mode=client_mode, status_loglevel=loglevel, start=True, gate=gate,
        )
        trust(self.state_averager, self.tracker)
        self.state_averager.expected_bytes = download_bytes
        self.global_params = [p for group in self.state_averager.optimizer.param_groups for p in group["params"]]
        self.pseudo_gradients = [p.grad for p in self.global_params]  # the outer SGD's .grad: what rounds average
        self.averager = CheckedDecentralizedAverager(
            averaged_tensors=self.pseudo_gradients, dht=dht, prefix=f"{run_id}_diloco_outer",
            compression=compression, min_matchmaking_time=matchmaking_time, allreduce_timeout=allreduce_timeout,
            tensor_infos=[CompressionInfo.from_tensor(t, key=i, role=TensorRole.GRADIENT)
                          for i, t in enumerate(self.pseudo_gradients)],
            client_mode=client_mode, allow_state_sharing=False, start=True, gate=gate,
            quarantine=quarantines.quarantine(),
        )
        self.scheduled: StepControl | None = None
        self.steps_since_outer = 0
        self.last_outer_step: OuterStep | None = None
        self.on_swarm_step: Callable[[OuterStep], None] | None = None

    # --- what the trainer sees (hivemind.Optimizer's names) ---------------------------------------------------

    @property
    def local_epoch(self) -> int:
        return self.state_averager.local_epoch

    @property
    def target_batch_size(self) -> int:
        return self.tracker.target_batch_size

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups  # torch's GradScaler unscales these

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none and not self.in_place)

    def step(self, closure=None, batch_size: int | None = None) -> None:
        """One local AdamW step; then the swarm step, when the swarm has trained enough."""
        assert closure is None, "DiLoCoOptimizer.step takes no closure"
        if self._missed_a_swarm_step():
            log.info("the swarm is at step %d, this peer at %d: downloading its state",
                     self.tracker.global_epoch, self.local_epoch)
            self.load_state_from_peers()
            return  # this gradient was computed on weights the swarm has left
        self.inner.step()
        self.steps_since_outer += 1
        peers = max(1, self.tracker.global_progress.num_peers)
        self.tracker.target_batch_size = self.local_steps * self.batch_size_per_step * peers
        samples = self.tracker.local_progress.samples_accumulated + (
            self.batch_size_per_step if batch_size is None else batch_size)
        self.tracker.report_local_progress(self.local_epoch, samples)
        self._maybe_schedule_round()
        if self._swarm_reached_target():
            self.last_outer_step = self._outer_step()
            if self.on_swarm_step is not None:
                self.on_swarm_step(self.last_outer_step)

    def global_weights(self) -> contextlib.AbstractContextManager:
        return self._global_weights_swapped_in()

    # --- the swarm step ------------------------------------------------------------------------------------

    def _swarm_reached_target(self) -> bool:
        """hivemind's readiness without its guess from the swarm's speed (which steps early after a burst of
        samples, as OpenDiLoCo also found): the samples are there, or another peer has stepped."""
        progress = self.tracker.global_progress
        return progress.epoch > self.local_epoch or progress.samples_accumulated >= self.tracker.target_batch_size

    def _missed_a_swarm_step(self) -> bool:
        in_a_group = self.scheduled is not None and not self.scheduled.done()
        return not in_a_group and self.tracker.global_epoch > self.local_epoch

    def _maybe_schedule_round(self) -> None:
        """Look for the round's group ahead of time, as hivemind.Optimizer does, so that peers reaching the target
        a moment apart still meet."""
        if self.tracker.global_progress.num_peers <= 1:
            return
        if self.tracker.estimated_next_update_time - get_dht_time() > self.matchmaking_time:
            return
        if self.scheduled is None or self.scheduled.triggered or self.scheduled.done():
            self.scheduled = self.averager.step(gather=self.local_epoch, wait=False, require_trigger=True,
                                                timeout=self.averaging_timeout)

    def _outer_step(self) -> OuterStep:
        start, local_steps = time.perf_counter(), self.steps_since_outer
        swarm_peers, round_step = max(1, self.tracker.global_progress.num_peers), self.local_epoch
        with self.tracker.pause_updates():
            samples = self.tracker.local_progress.samples_accumulated
            self._load_pseudo_gradients()
            group_size, outcome = 1, "alone"
            if self.tracker.global_progress.num_peers > 1 or self.scheduled is not None:
                group_size = self._average_pseudo_gradients(weight=max(samples, 1))
                outcome = "averaged" if group_size else "missed"
            if outcome != "missed":
                # SGD (Nesterov) on the global weights with the averaged pseudo-gradient; then they become the local
                # weights (hivemind copies the offloaded parameters back into the model)
                self.state_averager.step(increment_epoch=True, optimizer_step=True)
                self.tracker.update_epoch(new_epoch=self.local_epoch)
                if not self.client_mode:
                    self.state_averager.state_sharing_priority = self.local_epoch
                self.steps_since_outer = 0
        if outcome == "missed":
            self.load_state_from_peers()
        result = OuterStep(self.local_epoch, outcome, max(group_size, 1), swarm_peers, round_step, local_steps,
                           time.perf_counter() - start)
        log.info("swarm step %d: %s (group of %d, %d local steps, %.1f s)", result.swarm_step, result.outcome,
                 result.group_size, result.local_steps, result.seconds)
        return result

    def _average_pseudo_gradients(self, weight: float) -> int:
        """Average the pseudo-gradients with the round's group; the group's size, or 0 when the round failed."""
        control, self.scheduled = self.scheduled, None
        if control is None or control.triggered or control.done():
            control = self.averager.step(gather=self.local_epoch, wait=False, require_trigger=True,
                                         timeout=self.averaging_timeout)
        control.weight = weight
        control.allow_allreduce()
        try:
            gathered = control.result(self.averaging_timeout)
        except BaseException as exc:  # hivemind raises its own and asyncio's errors here
            log.warning("swarm step %d: averaging the pseudo-gradients failed (%s); this peer will download the "
                        "swarm's state instead of stepping alone", self.local_epoch + 1, repr(exc))
            if not control.done():
                control.cancel()
            return 0
        behind = [epoch for epoch in gathered.values() if isinstance(epoch, int) and epoch != self.local_epoch]
        if behind:
            log.warning("swarm step %d: averaged with peers at other swarm steps %s", self.local_epoch + 1, behind)
        return len(gathered)

    @torch.no_grad()
    def _load_pseudo_gradients(self) -> None:
        for local, global_, pseudo in zip(self.params, self.global_params, self.pseudo_gradients, strict=True):
            torch.sub(global_, local.detach().to(global_.device), out=pseudo)

    def load_state_from_peers(self) -> bool:
        """Download the swarm's global weights and outer momentum (what a late joiner or a peer that missed a
        swarm step needs) and restart the local phase from them. False if no peer could serve it."""
        if self.scheduled is not None and not self.scheduled.done():
            self._tag_along(self.scheduled)
        self.scheduled = None
        epoch_before, start = self.local_epoch, time.perf_counter()
        log.info("downloading the swarm's state: global weights and outer momentum, %.1f MB (giving up after %.0f s)",
                 self.download_bytes / 1e6, self.load_state_timeout)
        with self.tracker.pause_updates():
            try:
                self.state_averager.load_state_from_peers(timeout=self.load_state_timeout)
            except Exception as exc:  # a timeout or a peer that left: train on and try again at the next step
                log.warning("downloading the swarm's state failed (%s)", repr(exc))
                return False
            finally:
                self.tracker.report_local_progress(self.local_epoch, samples_accumulated=0)
            if self.tracker.global_epoch - 1 <= self.local_epoch < self.tracker.global_epoch:
                self.state_averager.local_epoch = self.tracker.global_epoch  # a peer that just stepped served it
                self.tracker.report_local_progress(self.local_epoch, samples_accumulated=0)
            if not self.client_mode:
                self.state_averager.state_sharing_priority = self.local_epoch
        self.steps_since_outer = 0
        seconds = time.perf_counter() - start
        loaded = self.local_epoch > epoch_before or self.tracker.global_epoch <= self.local_epoch
        # the measured size and rate: swarm/catch_up.py's line for the donor that served it
        log.info("downloaded the swarm's state in %.1f s: now at swarm step %d", seconds, self.local_epoch)
        return loaded

    def _tag_along(self, control: StepControl) -> None:
        """Leave a round this peer joined without holding it up: take part with weight zero."""
        if control.stage == AveragingStage.LOOKING_FOR_GROUP:
            control.cancel()
            return
        if not control.triggered:
            control.weight = 0
            control.allow_allreduce()
        try:
            control.result(self.averaging_timeout)
        except BaseException as exc:
            log.debug("a round left with weight zero ended with %r", exc)

    @contextlib.contextmanager
    def _global_weights_swapped_in(self) -> Iterator[None]:
        """The pseudo-gradient buffers are idle between rounds (in place: between a step and the next backward):
        they keep the local weights meanwhile."""
        with torch.no_grad():
            for local, global_, keep in zip(self.params, self.global_params, self.pseudo_gradients, strict=True):
                keep.copy_(local.detach())
                local.copy_(global_)
        try:
            yield
        finally:
            with torch.no_grad():
                for local, keep in zip(self.params, self.pseudo_gradients, strict=True):
                    local.copy_(keep)
                    if self.in_place:
                        keep.zero_()  # the model's .grad again

    # --- checkpoints and shutdown ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The inner AdamW's state, the outer momentum and the swarm step; the global weights are the
        checkpoint's model weights (checkpoints are written with them swapped in)."""
        return {"sync": "local_steps", "inner": self.inner.state_dict(),
                "outer": self.state_averager.optimizer.state_dict(), "local_epoch": self.local_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sync") != "local_steps":
            raise RuntimeError("this checkpoint's optimizer state was written with swarm.sync: every_step; resume it "
                               "with that mode, or start this run without --resume")
        self.inner.load_state_dict(state["inner"])
        self.state_averager.optimizer.load_state_dict(state["outer"])
        self.state_averager.local_epoch = state["local_epoch"]
        with torch.no_grad():  # the model was loaded from the checkpoint's (global) weights
            for local, global_ in zip(self.params, self.global_params, strict=True):
                global_.copy_(local.detach())

    def shutdown(self) -> None:
        self.tracker.shutdown(5)
        if self.scheduled is not None and not self.scheduled.done():
            if self.scheduled.stage == AveragingStage.LOOKING_FOR_GROUP:
                self.scheduled.cancel()
            else:
                self._tag_along(self.scheduled)
        self.averager.shutdown()
        self.state_averager.shutdown()
