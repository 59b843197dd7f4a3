"""One node's wiring and lifecycle: data, model, swarm, trainer; an ordered shutdown.

Only this module and cli.py see the whole config: every part below gets its own values.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sdswarm.config import Config
from sdswarm.data.buckets import make_buckets
from sdswarm.data.demo import make_demo_dataset
from sdswarm.data.loader import BatchStream
from sdswarm.data.workdir import list_pairs, materialize_folder
from sdswarm.model.ema import EMA
from sdswarm.model.loading import SDComponents, default_cache_dir, load_components
from sdswarm.model.text import PromptEncoder
from sdswarm.swarm.network import start_dht, stop_dht
from sdswarm.swarm.optimizer import make_optimizer
from sdswarm.train.checkpoint import Checkpoints, load_training_state
from sdswarm.train.loop import LoopSettings, Progress, Trainer
from sdswarm.train.step import fixed_seed_loss

log = logging.getLogger(__name__)

DEMO_SOURCE = "builtin:demo"
EVAL_BATCHES = 4


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA GPU is visible; set train.device: auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def prepare_model(components: SDComponents, *, device: torch.device, train_text_encoder: bool, fp16: bool):
    """Move the parts to the device; return the trainable parameters (the only ones hivemind may see)."""
    half_frozen = fp16 and device.type == "cuda"  # frozen parts need no fp32 master weights
    components.vae.requires_grad_(False).eval().to(device)
    components.unet.requires_grad_(True).to(device)
    components.text_encoder.requires_grad_(train_text_encoder).to(device)
    if half_frozen:
        components.vae.half()
        if not train_text_encoder:
            components.text_encoder.half()
    trainable = list(components.unet.parameters())
    if train_text_encoder:
        trainable += list(components.text_encoder.parameters())
    return trainable


def prepare_data(config: Config) -> BatchStream:
    data = config.data
    workdir = data.workdir or config.output.dir / "workdir"
    source = make_demo_dataset(default_cache_dir() / "demo-v1") if data.source == DEMO_SOURCE else Path(data.source)
    if not source.is_dir():
        raise FileNotFoundError(f"data.source {data.source!r} is not a folder of image + JSON pairs (or builtin:demo)")
    report = materialize_folder(source, workdir, categories=data.caption_categories)
    log.info("work dir %s: %d pairs written, %d already there, discarded: %s",
             workdir, report.written, report.skipped_existing, dict(report.discarded) or "none")
    buckets = make_buckets(config.resolution, config.buckets_side_min, config.buckets_side_max,
                           step=data.bucket_step, max_ratio=data.bucket_max_ratio)
    return BatchStream(
        list_pairs(workdir), buckets, batch_size=config.train.batch_size, images_per_chunk=data.images_per_chunk,
        shuffle=config.buckets_shuffle, seed=config.seed, num_workers=data.loader_workers,
    )


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Ctrl-C and SIGTERM ask the trainer to stop after the current step (it then saves a checkpoint)."""
    stop = threading.Event()

    def request_stop(signum, frame):
        log.warning("%s received: finishing the current step, then saving a checkpoint",
                    signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class RunSummary:
    progress: Progress
    eval_loss_start: float  # fixed-seed loss on the same batches before and after this run
    eval_loss_end: float


def run_mother(config: Config, *, resume: bool = False) -> RunSummary:
    """Start the first node of a swarm and train until max_steps or a stop signal."""
    torch.manual_seed(config.seed)
    device = pick_device(config.train.device)
    out = config.output.dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    checkpoints = Checkpoints(out / "checkpoints", keep=config.output.keep_checkpoints)
    resume_from = checkpoints.latest() if resume else None
    if resume and resume_from is None:
        log.warning("--resume: no checkpoint in %s yet, starting from %s", checkpoints.root, config.model)

    stream = prepare_data(config)
    log.info("aspect buckets:\n%s", stream.describe())
    components = load_components(str(resume_from) if resume_from else config.model)
    trainable = prepare_model(components, device=device, train_text_encoder=config.train_text_encoder,
                              fp16=config.fp16)
    encoder = PromptEncoder(components.tokenizer, components.text_encoder,
                            extended_chunks=config.extended_chunks, clip_penultimate=config.clip_penultimate)
    eval_batches = [batch for _, _, batch in itertools.islice(stream.iterate(), EVAL_BATCHES)]

    with stop_on_signals() as stop:
        swarm = config.swarm
        dht = start_dht(initial_peers=swarm.initial_peers, host_maddrs=swarm.host_maddrs,
                        announce_maddrs=swarm.announce_maddrs)
        optimizer = None
        try:
            optimizer = make_optimizer(
                dht=dht, params=trainable, swarm=swarm, batch_size_per_step=config.train.batch_size,
                lr=config.lr, betas=(config.opt_betas_one, config.opt_betas_two), eps=config.opt_epsilon,
                weight_decay=config.opt_weight_decay, max_grad_norm=config.train.max_grad_norm,
            )
            trainer = Trainer(
                components=components, encoder=encoder, train_text_encoder=config.train_text_encoder,
                stream=stream, optimizer=optimizer, trainable=trainable,
                ema=EMA(trainable, decay=config.train.ema_decay) if config.use_ema else None,
                checkpoints=checkpoints, settings=loop_settings(config), output_dir=out,
                config_yaml=config.to_yaml(), device=device,
            )
            if resume_from is not None:
                trainer.load_state_dict(load_training_state(resume_from))
                log.info("resumed from %s at step %d", resume_from, trainer.progress.step)

            def eval_loss() -> float:
                return fixed_seed_loss(components.unet, components.vae, components.noise_scheduler,
                                       encoder, eval_batches, seed=config.seed)

            summary = RunSummary(trainer.progress, eval_loss(), math.nan)
            trainer.run(stop)
            summary.eval_loss_end = eval_loss()
            log.info("fixed-seed eval loss: %.4f at the start, %.4f at the end (%d steps, %d skipped)",
                     summary.eval_loss_start, summary.eval_loss_end, summary.progress.step,
                     summary.progress.skipped_steps)
            return summary
        finally:
            if optimizer is not None:
                optimizer.shutdown()
            stop_dht(dht)


def loop_settings(config: Config) -> LoopSettings:
    out = config.output
    return LoopSettings(
        max_steps=config.train.max_steps, checkpoint_every=out.checkpoint_every, sample_every=out.sample_every,
        log_every=out.log_every, ucg=config.ucg, fp16=config.fp16, seed=config.seed,
        sample_prompts=out.sample_prompts, sample_size=(config.resolution, config.resolution),
        sample_steps=out.sample_steps, sample_guidance=out.sample_guidance,
    )
