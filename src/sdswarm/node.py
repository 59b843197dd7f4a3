"""One node's wiring and lifecycle: data, model, swarm, trainer; an ordered shutdown.

Only this module and cli.py see the whole config: every part below gets its own values.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import hivemind
import torch
from PIL import Image

from sdswarm.atomic import write_atomic
from sdswarm.config import Config, LoraConfig, Precision, SwarmConfig
from sdswarm.controls import NodeControls
from sdswarm.data.aspect import make_aspect_buckets
from sdswarm.data.bucket import bucket_routes
from sdswarm.data.chunks import SharedIndex, open_chunks, resolve_index
from sdswarm.data.demo import BUILTIN_DEMO
from sdswarm.data.index_share import index_routes
from sdswarm.data.loader import Batch, BatchStream, CaptionShuffle
from sdswarm.data.shards import choose_slot
from sdswarm.logs import attach_log_file, detach_log_file, set_stopping
from sdswarm.model.attention import set_attention
from sdswarm.model.ema import EMA
from sdswarm.model.loading import SDComponents, check_model, default_cache_dir, load_components
from sdswarm.model.lora import BaseIdentity, add_adapters, base_identity, check_base, load_adapters, read_base, size_of
from sdswarm.model.text import PromptEncoder
from sdswarm.swarm.admission import Admission, forward_admit
from sdswarm.swarm.exchange import (
    DATA_PATH,
    PROTOCOL,
    config_answer,
    describe_training,
    peers_answer,
    public_training,
)
from sdswarm.swarm.health import RoundLog, SwarmHealth, WeightFingerprint
from sdswarm.swarm.network import (
    connected_peer_addresses,
    reap_children,
    remember_peers,
    remembered_peers,
    start_dht,
    start_dht_rejoining,
    stop_dht,
)
from sdswarm.swarm.optimizer import (
    SwarmOptimizer,
    check_compression,
    compression_name,
    global_weights,
    make_optimizer,
    withdraw_progress,
)
from sdswarm.swarm.settings import IDENTITY_FILE, NodeSettings, load_settings
from sdswarm.swarm.telemetry import (
    GONE_AFTER,
    PeerMetrics,
    Publisher,
    progress_records,
    read_fingerprints,
    read_peers,
    read_swarm,
    wait_for_peers,
    wait_for_progress_from,
    wait_for_stragglers,
)
from sdswarm.train.checkpoint import Checkpoints, load_training_state
from sdswarm.train.grid_check import check_grid, tally
from sdswarm.train.latents import LatentCache
from sdswarm.train.loop import Progress, Trainer
from sdswarm.train.step import fixed_seed_loss, half_dtype
from sdswarm.train.trackers import open_trackers
from sdswarm.web.app import create_app
from sdswarm.web.auth import load_or_create_token
from sdswarm.web.log_tail import LogTail
from sdswarm.web.server import HttpServer, admit_routes, exchange_routes

log = logging.getLogger(__name__)

EVAL_BATCHES = 4
EVAL_FILE = "eval_batches.pt"  # the fixed-seed eval batches, kept so a resumed run fetches nothing for them


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA GPU is visible; set train.device: auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def prepare_model(components: SDComponents, *, device: torch.device, train_text_encoder: bool,
                  precision: Precision = "no", gradient_checkpointing: bool = False, attention: str = "default",
                  lora: LoraConfig | None = None, seed: int = 0):
    """Move the parts to the device; return the trainable parameters (the only ones hivemind may see).

    `lora`: freeze the UNet and text encoder and train adapters on them instead (initialised from `seed`, the same
    on every peer); on CUDA the frozen base is in half precision, the adapters in fp32."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError("train.mixed_precision: bf16, but this GPU has no bf16 support (Ampere or newer has); "
                           "use fp16: True instead")
    half_frozen = half_dtype(precision, device)  # frozen parts need no fp32 master weights
    components.vae.requires_grad_(False).eval().to(device)
    if lora is not None:
        trainable = add_adapters(components, lora, text_encoder=train_text_encoder, seed=seed)  # on the CPU: same RNG
        components.unet.to(device)
        components.text_encoder.to(device)
        if half_frozen is not None:
            for part in (components.vae, components.unet, components.text_encoder):
                part.to(half_frozen)
            for param in trainable:  # the same Parameter objects, back to fp32
                param.data = param.data.float()
    else:
        components.unet.requires_grad_(True).to(device)
        components.text_encoder.requires_grad_(train_text_encoder).to(device)
        if half_frozen is not None:
            components.vae.to(half_frozen)
            if not train_text_encoder:
                components.text_encoder.to(half_frozen)
        trainable = list(components.unet.parameters())
        if train_text_encoder:
            trainable += list(components.text_encoder.parameters())
    set_attention((components.unet, components.vae), attention)
    if gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if train_text_encoder:
            components.text_encoder.activation_checkpointing_enable()  # transformers 5's name for it
    # fp32 master weights: what autocast expects, and hivemind's fp16 compression refuses bf16 tensors
    if any(p.dtype != torch.float32 for p in trainable):
        raise RuntimeError(f"trainable parameters must be float32, found {sorted({str(p.dtype) for p in trainable})}")
    return trainable


def find_index(config: Config, relay: str | None = None) -> SharedIndex:
    """The index this peer trains on (a joiner without its own downloads it from `relay`), checked against
    the swarm's hash."""
    return resolve_index(config.data, out=config.output.dir / "index.db", demo_dir=demo_dir(),
                         cache=default_cache_dir() / "indexes", relay=relay)


def prepare_data(config: Config, *, seed: int | None = None, peer_id: str = "mother",
                 choose_slot: Callable[[int | None], int] | None = None, relay: str | None = None,
                 index: SharedIndex | None = None, start_slot: int | None = None) -> BatchStream:
    """The batches this peer trains: its shard of the index (the slot from the run seed and `peer_id`, or
    from `choose_slot` before each round, from `start_slot` on), ordered by `seed` (default: the run's).
    `relay`: a joiner's relay (base URL), where it fetches builtin:demo's files; `index`: from find_index."""
    data = config.data
    chunks = open_chunks(data, seed=config.seed, peer_id=peer_id, workdir=data.workdir or config.output.dir / "workdir",
                         index_out=config.output.dir / "index.db", demo_dir=demo_dir(),
                         choose_slot=choose_slot, demo_mirror=relay + DATA_PATH if relay else None,
                         index=index or find_index(config, relay), start_slot=start_slot)
    buckets = make_aspect_buckets(config.resolution, config.buckets_side_min, config.buckets_side_max,
                                  step=data.bucket_step, max_ratio=data.bucket_max_ratio)
    tag_shuffle = CaptionShuffle(data.caption_separator, data.caption_keep_first) if data.caption_shuffle else None
    return BatchStream(
        chunks, buckets, batch_size=config.train.batch_size, shuffle=config.buckets_shuffle,
        seed=config.seed if seed is None else seed, num_workers=data.loader_workers,
        caption_shuffle=tag_shuffle, max_pixels=data.max_image_pixels,
    )


@contextlib.contextmanager
def stop_on_signals(*events: threading.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM set `events`: the trainer stops after the current step, saves a checkpoint and the
    node exits. A second Ctrl-C interrupts at once."""

    def request_stop(signum, frame):
        log.warning("%s received: finishing the current step, then saving a checkpoint",
                    signal.Signals(signum).name)
        for event in events:
            event.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    global _stopping_pid
    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    _stopping_pid = os.getpid()
    try:
        yield
    finally:
        _stopping_pid = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_stopping_pid: int | None = None  # the process whose stop_on_signals is active


def _children_leave_stop_signals_to_the_parent() -> None:
    """In a forked child (hivemind's DHT and averagers, and their p2pd): ignore Ctrl-C and SIGTERM.

    A terminal's Ctrl-C and a group's SIGTERM reach every process of the node. The parent finishes its step
    with the children's help, then ends them in order (stop_dht, optimizer.shutdown, reap_children); a child
    that ran the parent's handler or died at once would stall that stop for its grace periods."""
    if _stopping_pid is not None and os.getpid() != _stopping_pid:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


os.register_at_fork(after_in_child=_children_leave_stop_signals_to_the_parent)


@dataclass
class RunSummary:
    progress: Progress
    eval_loss_start: float  # fixed-seed loss on the same batches before and after this run
    eval_loss_end: float


def peer_seed(run_seed: int, peer_id: str, role: str) -> int:
    """The mother keeps the run's seed (a lone run is reproducible from it); every other peer gets its own
    from the seed and its identity, so peers never draw the same data order or noise."""
    if role == "mother":
        return run_seed
    return int.from_bytes(hashlib.sha256(f"{run_seed}:{peer_id}".encode()).digest()[:4], "big")


def run_mother(config: Config, *, settings: NodeSettings | None = None, resume: bool = False,
               peers: Sequence[str] = ()) -> RunSummary:
    """Start the first node of a swarm (alone, it trains alone) and train until max_steps, max_swarm_steps or a
    signal.

    A mother that restarts rejoins the swarm it left: it tries `peers` (relays' I.E addresses or DHT multiaddrs)
    and, with `resume`, the peers it last saw (OUTPUT/peers), before starting alone."""
    known = [*peers, *(remembered_peers(config.output.dir) if resume else [])]
    return run_node(config, role="mother", settings=settings or load_settings(config.output.dir), resume=resume,
                    rejoin=known)


def run_node(
    config: Config,
    *,
    role: Literal["mother", "joiner"],
    settings: NodeSettings,
    initial_peers: Sequence[str] = (),
    rejoin: Sequence[str] = (),
    resume: bool = False,
    relay: str | None = None,
    swarm_base: BaseIdentity | None = None,
    invite: str | None = None,
) -> RunSummary:
    """Train as the mother or as a joiner (`relay`: the base URL of the relay it joined through; `swarm_base`: the
    base model of the LoRA swarm being joined, which this peer's must match; `invite`: a joiner's invitation, presented
    to `relay` for its access token)."""
    torch.manual_seed(config.seed)
    device = pick_device(config.train.device)
    checkpoints, resume_from = open_output(config, resume)
    # what can fail for the user's reasons fails here, before the DHT and the data start: the model, the index
    if resume_from is None:
        check_model(config.model)
    index = find_index(config, relay)
    state = load_training_state(resume_from) if resume_from is not None else None
    resumed_slot = state["progress"].get("data_slot") if state is not None else None
    admission = Admission.for_node(access_mode=config.swarm.access, run_id=config.swarm.run_id,
                                   folder=config.output.dir, identity_path=config.output.dir / IDENTITY_FILE,
                                   mother=role == "mother", invite=invite, relay=relay)
    stop_training, quit_node = threading.Event(), threading.Event()
    with contextlib.ExitStack() as cleanup, stop_on_signals(stop_training, quit_node):
        # before any fork: the children log there too
        cleanup.callback(detach_log_file, attach_log_file(config.output.dir))
        cleanup.callback(set_stopping, False)  # the next node in this process shows its libraries' warnings again
        cleanup.callback(reap_children)  # runs last: whatever the orderly shutdown left behind
        # started first: the peer's identity seeds its data order and noise
        dht_options = dict(host_maddrs=settings.dht_host_maddrs(), announce_maddrs=settings.dht_announce_maddrs(),
                           client_mode=settings.client_mode, identity_path=str(config.output.dir / IDENTITY_FILE),
                           **admission.dht_options())
        dht = (start_dht_rejoining(rejoin, **dht_options) if rejoin and not initial_peers
               else start_dht(initial_peers=initial_peers, **dht_options))
        cleanup.callback(stop_dht, dht)
        peer_id = str(dht.peer_id)
        admission.start(dht)
        cleanup.callback(admission.stop)
        seed = peer_seed(config.seed, peer_id, role)

        # the data slot is chosen before each round among the slots the other peers publish (after the
        # start-up barrier for the first): peers train disjoint posts without asking anyone
        stream = prepare_data(config, seed=seed, peer_id=peer_id, choose_slot=partial(choose_data_slot, dht, config,
                              peer_id), relay=relay, index=index, start_slot=resumed_slot)
        cleanup.callback(stream.close)
        trainer = build_trainer(config, dht, stream, checkpoints, resume_from, state, seed=seed, device=device,
                                cleanup=cleanup, swarm_base=swarm_base, admission=admission)
        del state
        health = watch_health(config, dht, trainer, cleanup)
        trainer.at_swarm_end = partial(end_together, trainer.optimizer, health, quit_node)
        controls = NodeControls(
            trainer=trainer, settings_dir=config.output.dir, run_id=config.swarm.run_id,
            # the optimizer's target: DiLoCo's is swarm.local_steps x batch x peers, not the config's
            swarm_view=lambda: read_swarm(dht, config.swarm.run_id, trainer.optimizer.target_batch_size),
            data_stats=stream.stats, join_address=None, announced=[str(a) for a in dht.get_visible_maddrs()],
            log_tail=cleanup.enter_context(LogTail().attached()), stop_training=stop_training, quit=quit_node,
            training=training_mode(config, trainer.trainable, trainer.lora_base), admission=admission,
        )
        address = start_http(config, settings, dht, controls, cleanup, index, lora_base=trainer.lora_base,
                             admission=admission)
        publish_metrics(dht, config.swarm.run_id, trainer, stream, peer_id=peer_id, owner=admission.owner,
                        address=address,
                        role="mother" if role == "mother" else settings.mode, cleanup=cleanup,
                        state=lambda: controls.state, health=health, remember_in=config.output.dir)

        cleanup.callback(set_stopping, True)  # registered last, so it runs first
        joined = join_swarm(trainer.optimizer, dht, config.swarm, admission.owner)
        if trainer.lora_base is not None:  # again: the peers that started with this one have published by now
            check_peer_bases(dht, config.swarm.run_id, peer_id, trainer.lora_base)
        if not joined and config.swarm.min_peers > 1:
            trainer.after_first_step = partial(wait_for_progress_from, trainer.optimizer, config.swarm.min_peers,
                                               config.swarm.startup_timeout)
        position = trainer.progress
        # the round training starts with (after a resume, the one it stopped in), in this peer's slot
        log.info("aspect buckets:\n%s", stream.describe(position.data_round))
        if resumed_slot is not None and stream.slot_of(position.data_round) != resumed_slot:
            log.warning("resumed in round %d at batch %d: this peer trained it from data slot %d, now slot %d (a "
                        "peer of higher priority holds %d): the rest of the round comes from slot %d's chunk",
                        position.data_round, position.data_batch, resumed_slot, stream.slot_of(position.data_round),
                        resumed_slot, stream.slot_of(position.data_round))
        return train_and_evaluate(trainer, controls, stream, seed=config.seed,
                                  eval_file=config.output.dir / EVAL_FILE)


def open_output(config: Config, resume: bool) -> tuple[Checkpoints, Path | None]:
    """The output folder with the run's config.yaml; its checkpoints, and the one to resume from (--resume)."""
    out = config.output.dir
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", config.to_yaml().encode("utf-8"))
    checkpoints = Checkpoints(out / "checkpoints", keep=config.output.keep_checkpoints, config_yaml=config.to_yaml(),
                              train_text_encoder=config.train_text_encoder)
    resume_from = checkpoints.latest() if resume else None
    if resume and resume_from is None:
        log.warning("--resume: no checkpoint in %s yet, starting from %s", checkpoints.root, config.model)
    return checkpoints, resume_from


def build_trainer(config: Config, dht: hivemind.DHT, stream: BatchStream, checkpoints: Checkpoints,
                  resume_from: Path | None, state: dict | None, *, seed: int, device: torch.device,
                  cleanup: contextlib.ExitStack, swarm_base: BaseIdentity | None = None,
                  admission: Admission | None = None) -> Trainer:
    """The model on its device, hivemind's optimizer over its trainable parameters, and the trainer (resumed
    from `resume_from` and its training `state` when given). LoRA: adapters on the base, which must be
    `swarm_base` when given."""
    lora = config.train.lora
    # a LoRA checkpoint holds the adapters only: the base always comes from `model`
    components = load_components(str(resume_from) if resume_from and lora is None else config.model)
    lora_base = check_lora_base(config.model, components, swarm_base, resume_from) if lora else None
    if lora_base is not None:  # before hivemind sees this peer: not one averaging round on another base
        check_peer_bases(dht, config.swarm.run_id, str(dht.peer_id), lora_base)
    trainable = prepare_model(components, device=device, train_text_encoder=config.train_text_encoder,
                              precision=config.precision, gradient_checkpointing=config.train.gradient_checkpointing,
                              attention=config.train.attention, lora=lora, seed=config.seed)
    if lora is not None and resume_from is not None:
        load_adapters(components, resume_from)  # before the optimizer copies them
    log.info("training: %s", describe_training(training_mode(config, trainable, lora_base)))
    optimizer = make_optimizer(
        dht=dht, params=trainable, swarm=config.swarm, batch_size_per_step=config.train.batch_size,
        lr=config.lr, betas=(config.opt_betas_one, config.opt_betas_two), eps=config.opt_epsilon,
        weight_decay=config.opt_weight_decay, max_grad_norm=config.train.max_grad_norm,
        optimizer_8bit=config.train.optimizer_8bit,
        mapped_state_dir=Path(config.output.dir) / "swarm_state",  # DiLoCo on the CPU: the global weights' files
        identity=admission.identity if admission else None, gate=admission.gate() if admission else None,
    )
    cleanup.callback(optimizer.shutdown)
    trainer = Trainer(
        components=components, trainable=trainable,
        encoder=PromptEncoder(components.tokenizer, components.text_encoder,
                              extended_chunks=config.extended_chunks, clip_penultimate=config.clip_penultimate),
        ema=EMA(trainable, decay=config.train.ema_decay) if config.use_ema else None,
        latent_cache=latent_cache(config), stream=stream, optimizer=optimizer, checkpoints=checkpoints,
        device=device, train=config.train, output=config.output, precision=config.precision, ucg=config.ucg,
        resolution=config.resolution, seed=seed, lora_base=lora_base,
        trackers=open_trackers(config.output.log_with, config.output.dir, config.swarm.run_id,
                               config.model_dump(mode="json")),
    )
    for tracker in trainer.trackers:
        cleanup.callback(tracker.close)
    if resume_from is not None and state is not None:
        trainer.load_state_dict(state)
        log.info("resumed from %s at step %d", resume_from, trainer.progress.step)
    return trainer


def watch_health(config: Config, dht: hivemind.DHT, trainer: Trainer, cleanup: contextlib.ExitStack) -> SwarmHealth:
    """Rounds, gradient norm and weight fingerprint of each swarm step: logged, in metrics.jsonl, published."""
    rounds = RoundLog(config.output.dir / "metrics.jsonl", values=sum(p.numel() for p in trainer.trainable),
                      bytes_per_value=check_compression(compression_name(config.swarm))[0])
    health = SwarmHealth(trainer.optimizer, rounds, WeightFingerprint(trainer.trainable, seed=config.seed),
                         peer_fingerprints=partial(read_fingerprints, dht, config.swarm.run_id),
                         resync_after_failed_round=config.swarm.after_failed_round == "resync",
                         last_swarm_step=config.train.max_swarm_steps).attach()
    cleanup.callback(health.detach)
    return health


def latent_cache(config: Config) -> LatentCache | None:
    """train.cache_latents: room for one chunk's images (each encoded once per chunk)."""
    return LatentCache(config.data.images_per_chunk) if config.train.cache_latents else None


def publish_metrics(dht: hivemind.DHT, run_id: str, trainer: Trainer, stream: BatchStream, *, peer_id: str,
                    owner: bytes, address: str | None, role: str, cleanup: contextlib.ExitStack,
                    state: Callable[[], str] = lambda: "training", health: SwarmHealth | None = None,
                    remember_in: Path | None = None) -> None:
    """This peer's figures in the DHT, for the other peers' UIs, until the node stops; and, in `remember_in`,
    the addresses of the peers it sees (OUTPUT/peers, for a restart)."""
    publisher = Publisher(dht, run_id, lambda: peer_metrics(
        trainer.progress, peer_id, role, address, stream.chunks.slot, state(), health, trainer.lora_base), owner,
        after=None if remember_in is None else partial(keep_peer_addresses, dht, run_id, peer_id, remember_in))
    publisher.start()
    cleanup.callback(publisher.stop)


def train_and_evaluate(trainer: Trainer, controls: NodeControls, stream: BatchStream, *, seed: int,
                       eval_file: Path) -> RunSummary:
    """Train until done, with the fixed-seed loss on the same batches before and after."""
    eval_batches = load_eval_batches(eval_file, stream, trainer.progress.data_round)
    components = trainer.components

    def eval_loss() -> float:
        with global_weights(trainer.optimizer):  # DiLoCo: the swarm's weights
            return fixed_seed_loss(components.unet, components.vae, components.noise_scheduler,
                                   trainer.encoder, eval_batches, seed=seed)

    summary = RunSummary(trainer.progress, eval_loss(), math.nan)
    train_until_done(trainer, controls)
    summary.eval_loss_end = eval_loss()
    log.info("fixed-seed eval loss: %.4f at the start, %.4f at the end (%d steps, %d skipped)",
             summary.eval_loss_start, summary.eval_loss_end, summary.progress.step, summary.progress.skipped_steps)
    if trainer.last_samples is not None:
        report_samples(trainer.last_samples, trainer.output.sample_prompts, trainer.resolution)
    return summary


def report_samples(grid: Path, prompts: Sequence[str], size: int) -> None:
    """Where the last grid is, and for the demo's prompts whether each sample shows its shape and colours."""
    checks = check_grid(Image.open(grid), prompts, size, size)
    if not checks:
        log.info("samples: %s", grid)
        return
    log.info("samples: %s: %s\n  %s", grid, tally(checks), "\n  ".join(c.describe() for c in checks))


def load_eval_batches(path: Path, stream: BatchStream, data_round: int) -> list[Batch]:
    """The fixed-seed eval batches: kept in `path` from the run's first start (so a resumed run fetches nothing
    for them), else the first batches of the pass training starts with, saved there."""
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            return [Batch(pixels=pixels, captions=list(captions)) for pixels, captions in saved]
        except Exception as exc:  # damaged, or another layout: make them again
            log.warning("eval batches %s unreadable (%s): taking them from round %d", path, exc, data_round)
    batches = [batch for _, _, batch in itertools.islice(stream.iterate(data_round), EVAL_BATCHES)]
    buffer = io.BytesIO()
    torch.save([(b.pixels, b.captions) for b in batches], buffer)
    write_atomic(path, buffer.getvalue())
    return batches


def end_together(optimizer: SwarmOptimizer, health: SwarmHealth, stop: threading.Event) -> None:
    """train.max_swarm_steps reached: wait for the peers still finishing the last step, then average the weights with
    all of them, before the last checkpoint."""
    timeout = optimizer.averaging_timeout + optimizer.load_state_timeout
    wait_for_stragglers(optimizer, timeout, stop)

    def peers_here() -> int:  # at this last step, this peer included (a peer that trains on is not waited for)
        try:
            records = progress_records(optimizer)
        except Exception as exc:  # the DHT is having trouble: end without the last round
            log.warning("could not read the swarm's progress for the last round: %s", exc)
            return 1
        here = {peer for peer, record in records.items() if record["epoch"] == optimizer.local_epoch}
        return len(here | {str(optimizer.dht.peer_id)})

    health.final_round(peers_here, timeout, stop)


def train_until_done(trainer: Trainer, controls: NodeControls) -> None:
    """Train until max_steps, max_swarm_steps or a signal. A stop from the UI pauses training (after a checkpoint)
    and the node stays up, serving its UI, until it is started again or told to quit."""
    while True:
        controls.state = "training"
        trainer.run(controls.stop_training)
        if controls.quit.is_set() or not controls.stop_training.is_set():
            return  # a signal, or max_steps / max_swarm_steps reached
        controls.state = "stopped"
        trainer.progress.samples_per_second = 0.0
        withdraw_progress(trainer.optimizer)
        log.info("training stopped from the UI at step %d; start it again there, or Ctrl-C to quit",
                 trainer.progress.step)
        while not (controls.resume.wait(1.0) or controls.quit.is_set()):
            pass
        controls.resume.clear()
        if controls.quit.is_set():
            return


def check_lora_base(model: str, components: SDComponents, swarm_base: BaseIdentity | None,
                    resume_from: Path | None) -> BaseIdentity:
    """Name this peer's base model (hash its weights) and refuse adapters trained on another: the swarm's, or the
    checkpoint's this run resumes from."""
    started = time.perf_counter()
    ours = base_identity(model, components)
    log.info("base model %s (hashed in %.1f s)", ours.describe(), time.perf_counter() - started)
    if swarm_base is not None:
        check_base(ours, swarm_base, "the swarm")
    if resume_from is not None:
        check_base(ours, read_base(resume_from), f"checkpoint {resume_from}")
    return ours


def check_peer_bases(dht: hivemind.DHT, run_id: str, peer_id: str, ours: BaseIdentity) -> None:
    """Refuse to train when a live peer of the swarm publishes another base model than this peer's: the relay's
    answer is checked on joining (cli.join), but a peer may reach the swarm through the DHT alone (`--peers`, a
    restart's OUTPUT/peers) or through a relay whose answer is stale."""
    now = time.time()
    for peer in read_peers(dht, run_id):
        if peer.peer_id != peer_id and peer.base_sha256 is not None and now - peer.time <= GONE_AFTER:
            check_base(ours, BaseIdentity(model=peer.base_model or "an unnamed model", sha256=peer.base_sha256),
                       f"the swarm's peer {peer.peer_id}")


def training_mode(config: Config, trainable: Sequence[torch.nn.Parameter], lora_base: BaseIdentity | None) -> dict:
    """What this node trains, for the log, the UI and `sdswarm status`."""
    parameters, size = size_of(trainable)
    lora = config.train.lora
    return {"mode": "lora" if lora else "full", "rank": lora.rank if lora else None,
            "alpha": lora.scale_alpha if lora else None, "text_encoder": config.train_text_encoder,
            "parameters": parameters, "megabytes": round(size / 1e6, 2),
            "base_model": lora_base.to_json() if lora_base else None}


def join_swarm(optimizer: SwarmOptimizer, dht: hivemind.DHT, swarm: SwarmConfig, owner: bytes) -> bool:
    """Before the first step: catch up with a swarm already under way (True), or wait for the first peers."""
    optimizer.tracker.fetched_global_progress_this_epoch.wait(timeout=30)
    if optimizer.tracker.global_epoch > optimizer.local_epoch:
        log.info("the swarm is at swarm step %d, this peer at %d: downloading the current state from peers "
                 "(about %.1f MB)", optimizer.tracker.global_epoch, optimizer.local_epoch,
                 optimizer.download_bytes / 1e6)
        optimizer.load_state_from_peers()
        log.info("caught up: now at swarm step %d (downloaded the swarm's state: %.3f MB)", optimizer.local_epoch,
                 optimizer.download_bytes / 1e6)
        return True
    # peers reporting samples to hivemind: the swarm is under way (a late joiner, a restart within the current
    # swarm step), and the barrier it would wait at has passed
    training = optimizer.tracker.global_progress.num_peers
    if swarm.min_peers > 1 and training + 1 >= swarm.min_peers:
        log.info("start-up barrier skipped: hivemind already sees %d peers training", training)
        return True
    if swarm.min_peers > 1:
        wait_for_peers(dht, swarm.run_id, owner, swarm.min_peers, swarm.startup_timeout)
    return False


def start_http(config: Config, settings: NodeSettings, dht: hivemind.DHT, controls: NodeControls,
               cleanup: contextlib.ExitStack, index: SharedIndex, lora_base: BaseIdentity | None = None,
               admission: Admission | None = None) -> str | None:
    """Serve the web UI, and on a relay the I.E endpoints beside it; return the address a friend joins with.

    A relay listens where its settings say; a client serves only its own UI, on loopback.
    """
    out = config.output.dir
    token = load_or_create_token(out)
    # folders whose names must not leak through the UI (the output folder is hidden by the UI itself)
    named = config.data.index
    index_dir = Path(named).parent if named and not named.startswith(("http://", "https://")) else None
    local = [config.data.source, config.data.workdir, index_dir, default_cache_dir()]
    private = tuple(Path(p) for p in local if p and not str(p).startswith(("builtin:", "http://", "https://")))
    app = create_app(controls, admin_token=token, private_paths=private, public_downloads=settings.public_downloads)
    routes = [] if settings.client_mode else exchange_routes(
        config_answer=partial(config_answer, config, index.sha256, lora_base),
        peers_answer=lambda: peers_answer([str(a) for a in dht.get_visible_maddrs()]),
        swarm_answer=lambda: {"protocol": PROTOCOL, "training": public_training(controls.training), **controls.swarm()},
    )
    if routes:  # every relay serves the index it trains on: its joiners need no local copy
        routes += index_routes(index.file, index.sha256)
    if routes and admission is not None and admission.access is not None:  # an invite-only swarm's relay
        routes += admit_routes(admission.admitter.admit if admission.admitter is not None else partial(
            forward_admit, admitting_relays=partial(mother_addresses, dht, config.swarm.run_id)))
    if routes and config.data.source == BUILTIN_DEMO:  # the demo is a real bucket, served by every relay
        routes += bucket_routes(demo_dir(), prefix=DATA_PATH)
    host = "127.0.0.1" if settings.client_mode else settings.listen_host
    server = HttpServer(routes, host, settings.ie_port_internal, app=app)
    port = server.start()
    cleanup.callback(server.stop)
    ui_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    log.info("web UI: http://%s:%d/  (admin token, for settings and controls: %s; kept in %s)",
             ui_host, port, token, out / "admin_token")
    if settings.client_mode:
        return None
    address = f"{settings.public_address or settings.listen_host}:{settings.ie_port_external or port}"
    controls.join_address = address
    if admission is not None and admission.access is not None:
        log.info("relay: others join this swarm with:  sdswarm join %s --invite INVITE  (sdswarm invite --output %s "
                 "prints one)", address, out)
    else:
        log.info("relay: others join this swarm with:  sdswarm join %s", address)
    return address


def demo_dir() -> Path:
    return default_cache_dir() / "demo-v4"


def peer_metrics(progress: Progress, peer_id: str, role: str, address: str | None, data_slot: int | None,
                 state: str = "training", health: SwarmHealth | None = None,
                 lora_base: BaseIdentity | None = None) -> PeerMetrics:
    loss = progress.loss_avg if math.isfinite(progress.loss_avg) else None
    return PeerMetrics(peer_id=peer_id, role=role, state=state, address=address, step=progress.step,
                       samples_seen=progress.samples_seen, loss=loss,
                       samples_per_second=progress.samples_per_second if state == "training" else 0.0,
                       local_epoch=progress.local_epoch, data_slot=data_slot, time=time.time(),
                       base_model=lora_base.model[:256] if lora_base else None,
                       base_sha256=lora_base.sha256 if lora_base else None,
                       **(health.published() if health is not None else {}))


def keep_peer_addresses(dht: hivemind.DHT, run_id: str, peer_id: str, output_dir: Path) -> None:
    """OUTPUT/peers: the relays and DHT addresses of the peers seen now, tried first when this node restarts."""
    now = time.time()
    relays = [m.address for m in read_peers(dht, run_id)
              if m.peer_id != peer_id and m.address and now - m.time <= GONE_AFTER]
    remember_peers(output_dir, relays + connected_peer_addresses(dht))


def mother_addresses(dht: hivemind.DHT, run_id: str) -> list[str]:
    """The relay addresses of the live mothers (the nodes that admit peers), from their signed metrics."""
    now = time.time()
    return [m.address for m in read_peers(dht, run_id)
            if m.role == "mother" and m.address and now - m.time <= GONE_AFTER]


def choose_data_slot(dht: hivemind.DHT, config: Config, peer_id: str, current: int | None) -> int:
    """This peer's data slot for its next round, from the slots the other live peers publish."""
    try:
        others = {m.peer_id: m.data_slot for m in read_peers(dht, config.swarm.run_id) if m.peer_id != peer_id}
    except Exception as exc:  # the DHT is having trouble: keep our slot (or take our first choice)
        log.warning("could not read the swarm's data slots (%s); keeping this peer's", exc)
        if current is not None:
            return current
        others = {}
    slot = choose_slot(config.seed, peer_id, current, others, config.data.shards)
    if slot != current and slot in others.values():
        log.warning("more peers than data.shards (%d): this peer shares slot %d, and so its posts, with another; "
                    "give the swarm a larger data.shards", config.data.shards, slot)
    return slot

