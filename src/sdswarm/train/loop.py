"""The training loop: batches in, hivemind steps, checkpoints and sample grids out. Reads top to bottom."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sdswarm.config import OutputConfig, Precision, TrainConfig
from sdswarm.data.loader import Batch, BatchStream
from sdswarm.model.ema import EMA
from sdswarm.model.loading import SDComponents
from sdswarm.model.lora import BaseIdentity
from sdswarm.model.text import PromptEncoder, drop_captions
from sdswarm.swarm.health import finish_pending_rounds
from sdswarm.swarm.optimizer import SwarmOptimizer, global_weights
from sdswarm.train.checkpoint import Checkpoints
from sdswarm.train.latents import LatentCache
from sdswarm.train.samples import render_grid, save_image
from sdswarm.train.step import diffusion_loss, encode_latents, half_dtype
from sdswarm.train.trackers import Tracker

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # one JSON record per log_every steps (Progress.snapshot() and the time)


@dataclass
class Progress:
    """What the trainer publishes about itself; readers (log, metrics, UI) only read it."""

    step: int = 0  # local steps (batches) trained
    samples_seen: int = 0
    data_round: int = 0  # where the batch stream resumes: the round, and the batch in it
    data_batch: int = 0
    data_slot: int | None = None  # the shard-plan slot the current round was drawn from
    skipped_steps: int = 0  # non-finite loss or fp16 overflow
    loss: float = math.nan
    loss_avg: float = math.nan  # exponential moving average of the loss
    samples_per_second: float = 0.0
    # swarm steps, by hivemind's counters: the one this peer's weights are at (its local_epoch), the swarm's newest
    local_epoch: int = 0
    swarm_epoch: int = 0
    swarm_samples: int = 0  # samples the swarm has collected toward the target batch
    target_batch_size: int = 0
    checkpoints: list[str] = field(default_factory=list)

    def snapshot(self) -> dict[str, Any]:
        """The figures as plain values (for metrics.jsonl, telemetry and the UI)."""
        return {k: v for k, v in asdict(self).items() if k != "checkpoints"}


class Trainer:
    """Trains `trainable` (the UNet's parameters, and the text encoder's when they require grad) with the
    `train` and `output` sections of the config, the how-to's `precision`, `ucg` and `resolution` (the sample
    grids' size), and this peer's `seed` (noise, caption dropout, samples)."""

    def __init__(
        self,
        *,
        components: SDComponents,
        encoder: PromptEncoder,
        trainable: Sequence[torch.nn.Parameter],
        ema: EMA | None,
        latent_cache: LatentCache | None,
        stream: BatchStream,
        optimizer: SwarmOptimizer,
        checkpoints: Checkpoints,
        device: torch.device,
        train: TrainConfig,
        output: OutputConfig,
        precision: Precision,
        ucg: float,
        resolution: int,
        seed: int,
        lora_base: BaseIdentity | None = None,
        trackers: Sequence[Tracker] = (),
    ) -> None:
        """`trainable`: what hivemind steps (LoRA: the adapters only, on the base named by `lora_base`)."""
        self.components, self.encoder, self.trainable = components, encoder, list(trainable)
        self.ema, self.latent_cache = ema, latent_cache
        self.stream, self.optimizer, self.checkpoints, self.device = stream, optimizer, checkpoints, device
        self.train, self.output, self.precision, self.ucg, self.resolution, self.seed = (
            train, output, precision, ucg, resolution, seed)
        self.output_dir, self.lora_base = Path(output.dir), lora_base
        self.trackers = list(trackers)  # TensorBoard, W&B: the metrics.jsonl figures, and the sample grids
        self.last_samples: Path | None = None  # the newest sample grid
        # prepare_model decided it: the text encoder trains when its parameters require grad
        self.train_text_encoder = any(p.requires_grad for p in components.text_encoder.parameters())
        self.noise_generator = torch.Generator(device).manual_seed(seed)
        self.caption_rng = random.Random(seed)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.type == "cuda")
        self.autocast_dtype = half_dtype(precision, device)
        self.progress = Progress(target_batch_size=optimizer.target_batch_size)
        self._last_saved_step = -1
        self.checkpoint_requested = threading.Event()  # "save now" from the UI, honoured after this step
        self.after_first_step: Callable[[], None] | None = None  # e.g. the swarm's start-up barrier
        self.at_swarm_end: Callable[[], None] | None = None  # train.max_swarm_steps: e.g. ending as one model

    # --- the loop ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> Progress:
        """Train until train.max_steps, train.max_swarm_steps or until `stop` is set; always ends with a checkpoint and
        a sample grid."""
        train, output, p = self.train, self.output, self.progress
        self.components.unet.train()
        self.components.text_encoder.train(self.train_text_encoder)
        bar = tqdm(total=train.max_steps, initial=p.step, unit="step", dynamic_ncols=True, desc="training")
        window_start, window_samples = time.perf_counter(), 0
        try:
            batches = self.stream.iterate(p.data_round, p.data_batch)
            while not stop.is_set() and not self.finished():
                data_round, data_batch, batch = next(batches)
                loss = self.train_step(batch)
                p.step += 1
                if p.step == 1 and self.after_first_step is not None:
                    self.after_first_step()
                p.samples_seen += len(batch.captions)
                p.data_round, p.data_batch = data_round, data_batch + 1
                p.data_slot = self.stream.slot_of(data_round)
                self._read_swarm_progress()  # every step: telemetry publishes these more often than log_every
                window_samples += len(batch.captions)
                self._record_loss(loss)
                if p.step % output.log_every == 0 or p.step == train.max_steps:
                    now = time.perf_counter()
                    p.samples_per_second = window_samples / max(now - window_start, 1e-9)
                    window_start, window_samples = now, 0
                    self._publish(bar)
                bar.update(1)
                if p.step % output.checkpoint_every == 0 or self.checkpoint_requested.is_set():
                    self.checkpoint_requested.clear()
                    self.save_checkpoint()
                if p.step % output.sample_every == 0:
                    self.save_samples()
        except BaseException:
            log.exception("training stopped by an error at step %d; saving a checkpoint", p.step)
            with contextlib.suppress(Exception):
                self.save_checkpoint(wait=True)
            raise
        finally:
            bar.close()
        if stop.is_set():
            log.info("stop requested at step %d: saving a checkpoint", p.step)
        finish_pending_rounds(self.optimizer)  # every peer saves the weights the swarm averaged last
        if self.swarm_finished and not stop.is_set() and self.at_swarm_end is not None:
            self.at_swarm_end()
        self.save_checkpoint(wait=True)
        if self.last_samples is None or self.last_samples.name != f"step_{p.step:08d}.png":  # not just made
            self.save_samples()
        return p

    @property
    def swarm_finished(self) -> bool:
        """The swarm reached train.max_swarm_steps: every peer stops here."""
        return self.train.max_swarm_steps is not None and self.optimizer.local_epoch >= self.train.max_swarm_steps

    def finished(self) -> bool:
        if self.swarm_finished:
            log.info("the swarm reached swarm step %d (train.max_swarm_steps): done", self.optimizer.local_epoch)
            return True
        return self.train.max_steps is not None and self.progress.step >= self.train.max_steps

    def train_step(self, batch: Batch) -> float:
        """One local step: loss, backward, hand the gradient to hivemind (which steps when the swarm is ready)."""
        c = self.components
        captions = drop_captions(batch.captions, self.ucg, self.caption_rng)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            if self.latent_cache is not None:  # hashes the CPU pixels, encodes only images not seen this chunk
                latents = self.latent_cache.latents(c.vae, batch.pixels, self.noise_generator)
            else:
                latents = encode_latents(c.vae, batch.pixels.to(self.device, non_blocking=True), self.noise_generator)
            with torch.set_grad_enabled(self.train_text_encoder):
                embeddings = self.encoder(captions)
            loss = diffusion_loss(c.unet, c.noise_scheduler, latents, embeddings, self.noise_generator,
                                  min_snr_gamma=self.train.min_snr_gamma, noise_offset=self.train.noise_offset)
        value = loss.item()  # the step's one host sync
        if not math.isfinite(value):  # never hand a NaN to the swarm
            log.warning("non-finite loss %s at step %d: batch skipped", value, self.progress.step + 1)
            self.progress.skipped_steps += 1
            return math.nan
        self.scaler.scale(loss).backward()
        if not self.scaler.is_enabled() and not _gradients_finite(self.trainable):
            # no GradScaler to catch it (fp32, bf16): an inf/NaN gradient would reach every peer's weights
            log.warning("non-finite gradient at step %d: batch skipped", self.progress.step + 1)
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.skipped_steps += 1
            return value
        swarm_step_before, scale_before = self.optimizer.local_epoch, self.scaler.get_scale()
        # unscales the gradient first (so hivemind accumulates and the inner AdamW clips true gradients),
        # skips the step on fp16 overflow; without fp16 it is a plain optimizer.step()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale_before:
            self.progress.skipped_steps += 1
        if self.ema is not None and self.optimizer.local_epoch != swarm_step_before:
            self.ema.update(self.trainable)  # the weights change only when the swarm steps
        return value

    # --- outputs ----------------------------------------------------------------------------------------

    def save_checkpoint(self, *, wait: bool = False) -> Path | None:
        """Training waits only while the weights and state are copied; the folder is written in the background.
        wait=True (at the end of a run, on stop): return once it is on disk."""
        if self.progress.step == self._last_saved_step:
            if wait:
                self.checkpoints.wait()
                self.progress.checkpoints = [p.name for p in self.checkpoints.all()]
            return None
        with global_weights(self.optimizer):  # DiLoCo: the swarm's weights, not this peer's local phase
            # copied here; the folder is written from the copy in the background
            path = self.checkpoints.save(self.progress.step, self.components, self.state_dict(),
                                         lora_base=self.lora_base)
        if wait:
            self.checkpoints.wait()
        self._last_saved_step = self.progress.step
        self.progress.checkpoints = [p.name for p in self.checkpoints.all()]
        return path

    def save_samples(self) -> Path:
        out = self.output
        swap = self.ema.swapped_in(self.trainable) if self.ema is not None else contextlib.nullcontext()
        with global_weights(self.optimizer), swap:
            grid = render_grid(
                self.components, self.encoder, out.sample_prompts, width=self.resolution, height=self.resolution,
                steps=out.sample_steps, guidance=out.sample_guidance, seed=self.seed,
            )
        path = save_image(grid, self.output_dir / "samples" / f"step_{self.progress.step:08d}.png")
        self.last_samples = path
        self._track(lambda tracker: tracker.log_image("samples", grid, self.progress.step))
        return path

    def _record_loss(self, loss: float) -> None:
        p = self.progress
        p.loss = loss
        if math.isfinite(loss):
            p.loss_avg = loss if math.isnan(p.loss_avg) else 0.95 * p.loss_avg + 0.05 * loss

    def _read_swarm_progress(self) -> None:
        p, tracker = self.progress, self.optimizer.tracker
        p.local_epoch, p.swarm_epoch = self.optimizer.local_epoch, tracker.global_epoch
        p.checkpoints = [c.name for c in self.checkpoints.all()]  # a background write may have finished since
        p.target_batch_size = self.optimizer.target_batch_size  # DiLoCo's follows the number of peers
        # what is past the target goes into a step that is due already: never shown as more than the target
        p.swarm_samples = min(tracker.global_progress.samples_accumulated, p.target_batch_size)

    def _publish(self, bar: tqdm) -> None:
        p = self.progress
        bar.set_postfix(
            loss=f"{p.loss_avg:.4f}", samples_s=f"{p.samples_per_second:.1f}",
            swarm_step=f"{p.local_epoch}/{p.swarm_epoch}", swarm=f"{p.swarm_samples}/{p.target_batch_size}",
            refresh=False,
        )
        record = p.snapshot()
        with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": time.time(), **record}) + "\n")
        self._track(lambda tracker: tracker.log(record, p.step))
        if not bar.disable and bar.fp.isatty():
            return
        log.info(
            "step %d  loss %.4f (avg %.4f)  %.1f samples/s  swarm step %d (swarm %d)  %d/%d samples toward the next",
            p.step, p.loss, p.loss_avg, p.samples_per_second, p.local_epoch, p.swarm_epoch,
            p.swarm_samples, p.target_batch_size,
        )

    def _track(self, send: Callable[[Tracker], None]) -> None:
        for tracker in self.trackers:
            try:
                send(tracker)
            except Exception as exc:  # a tracker's trouble (e.g. W&B offline) must not stop training
                log.warning("%s could not log: %s", type(tracker).__name__, exc)

    # --- resume -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        p = self.progress
        return {
            "progress": {k: getattr(p, k) for k in ("step", "samples_seen", "data_round", "data_batch", "data_slot",
                                                     "skipped_steps", "loss_avg")},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": {"noise": self.noise_generator.get_state(), "captions": self.caption_rng.getstate()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state["progress"].items():
            setattr(self.progress, _OLD_PROGRESS_NAMES.get(key, key), value)
        self._last_saved_step = self.progress.step
        self.optimizer.load_state_dict(state["optimizer"])
        # tell the swarm our restored swarm step right away, or hivemind takes us for out of sync
        self.optimizer.tracker.report_local_progress(self.optimizer.local_epoch, 0)
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.noise_generator.set_state(state["rng"]["noise"])
        self.caption_rng.setstate(state["rng"]["captions"])


_OLD_PROGRESS_NAMES = {"data_pass": "data_round"}  # checkpoints written before the rename still resume


def _gradients_finite(params: Sequence[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
