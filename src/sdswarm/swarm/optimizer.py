"""The swarm's optimizer, built from config in one place: hivemind.Optimizer (`swarm.sync: every_step`: peers
accumulate samples up to the target batch, then average gradients) or DiLoCo (`local_steps`, swarm/diloco.py)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import hivemind
import numpy as np
import torch
from hivemind.compression import (
    BlockwiseQuantization,
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    RoleAdaptiveCompression,
    ScaledFloat16Compression,
    SizeAdaptiveCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
)
from hivemind.utils.crypto import RSAPrivateKey

from sdswarm.config import SwarmConfig
from sdswarm.swarm.admission import Gate
from sdswarm.swarm.catch_up import GuardedOptimizer, forget_throughput
from sdswarm.swarm.costs import NetworkCosts
from sdswarm.swarm.diloco import DiLoCoOptimizer
from sdswarm.swarm.host_memory import share_before_fork
from sdswarm.swarm.validation import CheckedGradientAverager, QuarantineBoard

log = logging.getLogger(__name__)

COMPRESSIONS: dict[str, type[CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,  # a plain cast: zeroes values under ~6e-8 (small averaged gradients)
    "scaled_fp16": ScaledFloat16Compression,  # fp16 after mean/std scaling: keeps them
    "uniform8bit": Uniform8BitQuantization,
    "blockwise8bit": BlockwiseQuantization,  # bitsandbytes' dynamic 8-bit, needs it on every peer
}
MODE_DEFAULTS = {"every_step": "scaled_fp16", "local_steps": "uniform8bit"}

SwarmOptimizer = hivemind.Optimizer | DiLoCoOptimizer


def compression_name(swarm: SwarmConfig) -> str:
    """The codec averaging rounds send with: swarm.compression, or the mode's default for `auto`."""
    return MODE_DEFAULTS[swarm.sync] if swarm.compression == "auto" else swarm.compression


def state_compression() -> CompressionBase:
    """What a late joiner downloads: weights in fp16, optimizer statistics 8-bit (instead of all fp32).

    Plain fp16 for the weights (scaled fp16 stores two floats per row of the last axis: per 3 values for a 3x3
    conv); 8-bit bucket averages for the moments are never negative, so AdamW's sqrt(exp_avg_sq) stays finite."""
    # small tensors (AdamW's step counts, norms' scalars) whole: 8-bit statistics of one value divide by zero
    moments = SizeAdaptiveCompression(threshold=1024, less=NoCompression(), greater_equal=Uniform8BitQuantization())
    return RoleAdaptiveCompression(parameter=Float16Compression(), optimizer=moments, default=NoCompression())


def check_compression(name: str) -> tuple[float, float]:
    """Round-trip a tensor through `name` as hivemind's receivers decode it; (bytes per value, max error).

    A codec that fails here fails on every part a peer receives, and hivemind only logs it and averages
    without that part."""
    tensor = torch.linspace(-1.0, 1.0, 4096)
    try:
        with warnings.catch_warnings():  # torch's deprecation of the quantize_per_tensor that hivemind uses
            warnings.simplefilter("ignore")
            message = COMPRESSIONS[name]().compress(tensor, CompressionInfo.from_tensor(tensor, key=0))
            restored = deserialize_torch_tensor(message)
        error = (restored - tensor).abs().max().item()
    except Exception as exc:
        fix = ("It needs the bitsandbytes package on every peer (pip install bitsandbytes), or set "
               "swarm.compression: uniform8bit") if name == "blockwise8bit" else (
               "Install the pinned versions (pip install 'numpy<2.4'), or set swarm.compression: scaled_fp16")
        raise RuntimeError(
            f"swarm.compression {name!r} does not work in this environment ({type(exc).__name__}: {exc}; numpy "
            f"{np.__version__}, hivemind {hivemind.__version__}). {fix}"
        ) from exc
    if error > 0.05:  # 8-bit over [-1, 1]: about 0.01
        raise RuntimeError(f"swarm.compression {name!r} decodes a test tensor with an error of {error:.3g}")
    return len(message.buffer) / tensor.numel(), error


def global_weights(optimizer: SwarmOptimizer) -> contextlib.AbstractContextManager:
    """The weights the swarm agrees on, in the model while the block runs: what checkpoints, samples, exports and
    evaluations use. In every_step mode they are always there; in DiLoCo mode they replace the local weights."""
    return optimizer.global_weights() if isinstance(optimizer, DiLoCoOptimizer) else contextlib.nullcontext()


class ClipGradNorm:
    """Mixin for an optimizer class: clip the gradient it is about to apply.

    hivemind hands the inner optimizer the swarm-averaged gradient, so the norm is clipped
    once per global step on the gradient that is really applied (not on each peer's micro-batch).
    """

    def __init__(self, params, *, max_grad_norm: float | None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_grad_norm is not None:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        return super().step(closure)


class ClippedAdamW(ClipGradNorm, torch.optim.AdamW):
    """torch AdamW, clipped as ClipGradNorm says."""


def clipped_adamw_8bit() -> type[torch.optim.Optimizer]:
    """bitsandbytes' AdamW8bit, clipped as ClipGradNorm says (train.optimizer_8bit)."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise RuntimeError(
            "train.optimizer_8bit needs the bitsandbytes package, which is not installed (or does not load: "
            f"{exc}). Install it with: pip install bitsandbytes (needs a CUDA GPU), or set train.optimizer_8bit: false"
        ) from exc
    return type("ClippedAdamW8bit", (ClipGradNorm, bitsandbytes.optim.AdamW8bit), {})


class InPlaceGradientAverager(CheckedGradientAverager):
    """A CPU-only peer's gradient averager: the model's `.grad` buffers are the accumulators (backward adds each
    micro-batch in place, hivemind's `reuse_grad_buffers`), the tensors the round averages, and what AdamW applies.
    Stock hivemind holds three buffers per parameter for this (`.grad`, accumulator, averaged gradient)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], **kwargs) -> None:
        parameters = tuple(parameters)
        kwargs.pop("reuse_grad_buffers", None)
        super().__init__(parameters=parameters, reuse_grad_buffers=True,
                         averaged_grads=tuple(p.grad for p in parameters),
                         **kwargs)
        self._averaged_input_ready = False

    @torch.no_grad()
    def load_accumulators_into_averager_(self) -> None:
        """The sum of the micro-batches becomes their mean, in place, once per swarm step (hivemind calls this again
        when a round fails: the peer then applies its own mean gradient)."""
        if not self._averaged_input_ready:
            scale = 1.0 / self.local_times_accumulated if self.local_times_accumulated else 0.0
            with self.get_tensors() as grads:
                for grad in grads:
                    grad.mul_(scale)
            self._averaged_input_ready = True

    def step(self, *args, reset_accumulators: bool = True, **kwargs):
        # the buffers are the round's input and output: hivemind.Optimizer resets them after AdamW has applied them
        return super().step(*args, reset_accumulators=False, **kwargs)

    def reset_accumulated_grads_(self) -> None:
        self._averaged_input_ready = False
        super().reset_accumulated_grads_()


class InPlaceOptimizer(GuardedOptimizer):
    """hivemind.Optimizer for a CPU-only peer (device and host memory are one): AdamW steps the model's weights
    themselves, which are also what state averaging and a joiner's download read (no offloaded copy), and one
    `.grad` buffer per parameter serves every gradient role (InPlaceGradientAverager). 16 bytes per trainable
    parameter instead of 28. The trainer's zero_grad after a step keeps the accumulated micro-batches; a zero_grad
    without a step (a dropped micro-batch) drops what this peer accumulated toward the swarm step."""

    _took_batch = False

    def step(self, *args, **kwargs):
        self._took_batch = True
        return super().step(*args, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self._took_batch:  # its gradient is already summed into the buffers with the earlier micro-batches
            log.warning("dropping the %d samples this peer accumulated toward swarm step %d",
                        self.grad_averager.local_samples_accumulated, self.local_epoch + 1)
            self.grad_averager.reset_accumulated_grads_()
            self.tracker.report_local_progress(self.local_epoch, samples_accumulated=0)
        self._took_batch = False


def on_host_only(params: Iterable[torch.nn.Parameter]) -> bool:
    """Trains on the CPU: a second copy of a tensor "offloaded" to host memory would only double it."""
    return all(p.device.type == "cpu" for p in params)


@torch.no_grad()
def _initialize_state_in_place(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's moments made by one step at lr 0 on the (zero) .grad buffers, in shared memory (share_before_fork):
    the weights stay bit-identical and no temporary gradient copy is made (hivemind's virtual step allocates one and
    decays the weights once)."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    if isinstance(optimizer, ClipGradNorm):
        optimizer.last_grad_norm = None
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.share_memory_()


def make_optimizer(
    *,
    dht: hivemind.DHT,
    params: Iterable[torch.nn.Parameter],
    swarm: SwarmConfig,
    batch_size_per_step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    max_grad_norm: float | None,
    optimizer_8bit: bool = False,
    in_place: bool | None = None,
    mapped_state_dir: Path | None = None,
    verbose: bool = True,
    identity: RSAPrivateKey | None = None,
    gate: Gate | None = None,
) -> SwarmOptimizer:
    """Only trainable tensors may be given: hivemind would average frozen ones too. `in_place`: one copy of each
    tensor (InPlaceOptimizer; DiLoCo's pseudo-gradients in `.grad`); None: when training on the CPU.
    `mapped_state_dir`: in place, DiLoCo's global weights and outer momentum in file mappings there.

    `identity`: the key the DHT signs this peer's records with (its progress records must be signed by the same);
    `gate`: who may join its averaging rounds and download its state (swarm/admission.py; None: anyone).

    The lr is the config's, the same on every peer: hivemind already averages the gradient over
    the samples of all peers, so no peer scales it by its own batch size.
    """
    params = list(params)
    codec = compression_name(swarm)
    check_compression(codec)
    compression = COMPRESSIONS[codec]()
    inner_class = clipped_adamw_8bit() if optimizer_8bit else ClippedAdamW  # fails here, before any heavy work
    # a CPU-only peer keeps one gradient buffer per parameter for the whole run, made here (zeros) and shared with
    # hivemind's averager processes; a GPU peer keeps hivemind's layout (its optimizer in host memory)
    if in_place is None:
        in_place = on_host_only(params) and not optimizer_8bit
    if in_place:
        share_before_fork(params)

    def inner_optimizer(parameters):
        optimizer = inner_class(
            parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm
        )
        if in_place and swarm.sync == "every_step":
            _initialize_state_in_place(optimizer)
        return optimizer

    costs = NetworkCosts.of(params, swarm, codec, compression, state_compression())
    costs.log(swarm)
    if swarm.sync == "local_steps":
        return DiLoCoOptimizer(
            dht=dht, run_id=swarm.run_id, params=params, inner_optimizer=inner_optimizer,
            local_steps=swarm.local_steps, batch_size_per_step=batch_size_per_step,
            outer_lr=swarm.outer_lr, outer_momentum=swarm.outer_momentum,
            compression=compression, state_compression=state_compression(),
            matchmaking_time=swarm.matchmaking_time, averaging_timeout=swarm.averaging_timeout,
            allreduce_timeout=swarm.allreduce_timeout, load_state_timeout=costs.load_state_timeout(swarm),
            download_bytes=costs.download_bytes, client_mode=dht.client_mode, in_place=in_place,
            mapped_state_dir=mapped_state_dir if in_place else None, verbose=verbose,
            private_key=identity or RSAPrivateKey(), gate=gate,
        )
    # hivemind.Optimizer whose tracker, downloads and rounds check what other peers send (catch_up, validation),
    # and whose averagers serve admitted peers only (admission's gate) and keep the same peers out (quarantines)
    quarantines = QuarantineBoard(seats=2)
    optimizer = (InPlaceOptimizer if in_place else GuardedOptimizer)(
        gate=gate,
        quarantines=quarantines,
        dht=dht,
        run_id=swarm.run_id,
        params=params,
        optimizer=inner_optimizer,
        batch_size_per_step=batch_size_per_step,
        target_batch_size=swarm.target_batch_size,
        use_local_updates=False,
        matchmaking_time=swarm.matchmaking_time,
        averaging_timeout=swarm.averaging_timeout,
        allreduce_timeout=swarm.allreduce_timeout,
        load_state_timeout=costs.load_state_timeout(swarm),
        average_state_every=swarm.average_state_every,
        # every averager forms its groups with the same request_timeout, below matchmaking_time (config.py checks)
        # in place: the state averager averages and serves the model's weights themselves (no host copy)
        averager_opts=dict(request_timeout=swarm.matchmaking_request_timeout, **({"reuse_tensors": True}
                                                                                if in_place else {})),
        grad_averager_factory=partial(InPlaceGradientAverager if in_place else CheckedGradientAverager, gate=gate,
                                      quarantine=quarantines.quarantine(),
                                      request_timeout=swarm.matchmaking_request_timeout),
        tracker_opts=dict(private_key=identity) if identity is not None else None,
        grad_compression=compression,
        state_averaging_compression=compression,
        load_state_compression=state_compression(),
        # hivemind.Optimizer drops a given client_mode in favour of None; pass the DHT's own explicitly
        client_mode=dht.client_mode,
        # hivemind keeps the optimizer in host memory by default; bitsandbytes' 8-bit kernels want it on the GPU,
        # and on a CPU-only peer host memory is where the weights already are
        offload_optimizer=False if optimizer_8bit or in_place else None,
        verbose=verbose,
    )
    _undo_virtual_step(optimizer)
    _skip_gradient_download(optimizer)
    optimizer.download_bytes = costs.download_bytes  # as DiLoCoOptimizer has it: what a late joiner downloads
    optimizer.state_averager.expected_bytes = costs.download_bytes
    return optimizer


def _skip_gradient_download(optimizer: hivemind.Optimizer) -> None:
    """hivemind's load_state_from_peers (a late joiner's, or a peer's that fell behind) also downloads a peer's
    gradient buffers: a quarter of the bytes (4 of 16 per parameter, 3.4 GB for SD 1.5's UNet), never used, as
    this peer's own accumulators overwrite them before every round and the load resets the accumulators."""
    if optimizer.grad_averager is not None:
        optimizer.grad_averager.load_state_from_peers = lambda **kwargs: None


@torch.no_grad()
def _undo_virtual_step(optimizer: hivemind.Optimizer) -> None:
    """hivemind creates the optimizer's state with one virtual zero-gradient step. It leaves AdamW's step
    count at 1, so the first real update would be bias-corrected as a second one (about 0.74x too small),
    and it applies weight decay once to the optimizer's copy of the weights. Undo both, so the first swarm
    step is exactly a first AdamW step."""
    inner = optimizer.opt
    for state in inner.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            step.zero_()
        elif step is not None:
            state["step"] = 0
    copies = [param for group in inner.param_groups for param in group["params"]]
    for copy, main in zip(copies, optimizer.state_averager.main_parameters, strict=True):
        if copy is not main:  # offloaded: the optimizer steps its own copy and writes it back
            copy.copy_(main)


def withdraw_progress(optimizer: SwarmOptimizer) -> None:
    """A peer that pauses (stopped from its UI) takes its samples and its throughput out of the swarm's progress:
    the others no longer count them toward the target nor expect its next samples. Its accumulated gradients,
    trained on weights that will be stale when it resumes, are dropped."""
    tracker = optimizer.tracker
    if getattr(optimizer, "grad_averager", None) is not None:
        optimizer.grad_averager.reset_accumulated_grads_()
    forget_throughput(tracker)
    tracker.report_local_progress(optimizer.local_epoch, samples_accumulated=0)
