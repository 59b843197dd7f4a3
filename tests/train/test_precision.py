"""Mixed precision around hivemind: the clip sees true gradients, bad steps are skipped and counted, never sent.

CPU has no fp16 training path, so the GradScaler is swapped in by hand: a fake with GradScaler's contract
(scale the loss, divide the optimizer's gradients by the scale in step(), skip the step on inf/NaN, halve
the scale after a skip) and torch's own GradScaler, which also runs on CPU.
"""

from __future__ import annotations

import contextlib
import copy

import hivemind
import pytest
import torch
import torch.nn.functional as F
from hivemind.compression import CompressionInfo, Float16Compression

from sdswarm.config import SwarmConfig
from sdswarm.model.loading import TINY_MODEL_ID, load_components
from sdswarm.model.text import PromptEncoder
from sdswarm.node import latent_cache, prepare_data, prepare_model
from sdswarm.swarm.network import stop_dht
from sdswarm.swarm.optimizer import make_optimizer
from sdswarm.train.checkpoint import Checkpoints
from sdswarm.train.loop import Trainer

SCALE = 1024.0
TINY_CLIP = 1e-6  # below any real gradient norm: clipping is always active and reports the norm it saw


class FakeScaler:
    """torch.amp.GradScaler's contract, written out."""

    def __init__(self, scale: float = SCALE) -> None:
        self.scale_value, self.skipped_last = scale, False

    def is_enabled(self) -> bool:
        return True

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    def get_scale(self) -> float:
        return self.scale_value

    def step(self, optimizer) -> None:
        found_inf = False
        for group in optimizer.param_groups:  # hivemind.Optimizer's groups hold the model's own parameters
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.div_(self.scale_value)
                    found_inf |= not bool(torch.isfinite(param.grad).all())
        self.skipped_last = found_inf
        if not found_inf:
            optimizer.step()

    def update(self) -> None:
        if self.skipped_last:
            self.scale_value *= 0.5


def make_scaler(kind: str):
    return FakeScaler() if kind == "fake" else torch.amp.GradScaler("cpu", init_scale=SCALE)


@pytest.fixture
def config(tiny_config):
    # the plain reference below encodes prompts the textbook way
    return tiny_config.model_copy(update={"ucg": 0.0, "extended_chunks": 1, "clip_penultimate": False,
                                          "train_text_encoder": True, "seed": 11})


@contextlib.contextmanager
def one_peer(config, components, tmp_path, *, max_grad_norm: float | None):
    """A Trainer on one hivemind peer whose every local step (4 samples) is a global optimizer step."""
    trainable = prepare_model(components, device=torch.device("cpu"), train_text_encoder=True)
    dht = hivemind.DHT(start=True)
    optimizer = make_optimizer(
        dht=dht, params=trainable, batch_size_per_step=4, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
        max_grad_norm=max_grad_norm, verbose=False,
        swarm=SwarmConfig(target_batch_size=4, matchmaking_time=1, averaging_timeout=5, compression="none"),
    )
    try:
        trainer = Trainer(
            components=components, encoder=PromptEncoder(components.tokenizer, components.text_encoder),
            trainable=trainable, ema=None, latent_cache=latent_cache(config), stream=None, optimizer=optimizer,
            checkpoints=Checkpoints(tmp_path / "ckpt", keep=1), device=torch.device("cpu"), train=config.train,
            output=config.output.model_copy(update={"dir": tmp_path}), precision=config.precision, ucg=config.ucg,
            resolution=config.resolution, seed=config.seed,
        )
        components.unet.train()
        components.text_encoder.train()
        yield trainer
    finally:
        optimizer.shutdown()
        stop_dht(dht)


def first_batch(config):
    return next(prepare_data(config).iterate())[2]


def true_gradient_norm(components, batch, seed: int) -> float:
    """The textbook fp32 step (no scaler) on a copy of the model: the norm of the gradient over UNet + text encoder."""
    unet, vae, te, tok, sched = (components.unet, components.vae, components.text_encoder, components.tokenizer,
                                 components.noise_scheduler)
    unet.train()
    te.train()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = vae.encode(batch.pixels).latent_dist.sample(generator=generator) * vae.config.scaling_factor
    ids = tok(batch.captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
    prediction = unet(sched.add_noise(latents, noise, timesteps), timesteps, te(ids).last_hidden_state).sample
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
    F.mse_loss(prediction, target).backward()
    grads = [p.grad for p in [*unet.parameters(), *te.parameters()] if p.grad is not None]
    return torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()


@pytest.mark.parametrize("kind", ["fake", "torch"])
def test_clipping_measures_the_unscaled_gradient(config, tmp_path, kind):
    batch = first_batch(config)
    ours = load_components(TINY_MODEL_ID)
    expected = true_gradient_norm(copy.deepcopy(ours), batch, seed=config.seed)

    with one_peer(config, ours, tmp_path, max_grad_norm=TINY_CLIP) as trainer:
        trainer.scaler = make_scaler(kind)
        trainer.train_step(batch)
        assert trainer.optimizer.local_epoch == 1, "the step should have been a global optimizer step"
        measured = trainer.optimizer.state_averager.optimizer.last_grad_norm
    # scaled gradients would measure SCALE times more
    assert measured == pytest.approx(expected, rel=1e-4), (measured, expected, expected * SCALE)
    assert trainer.progress.skipped_steps == 0


@pytest.mark.parametrize("kind", ["fake", "torch"])
def test_inf_gradient_skips_the_step_counts_it_and_never_reaches_the_swarm(config, tmp_path, kind):
    batch = first_batch(config)
    components = load_components(TINY_MODEL_ID)
    with one_peer(config, components, tmp_path, max_grad_norm=1.0) as trainer:
        trainer.scaler = make_scaler(kind)
        before = [p.detach().clone() for p in trainer.trainable]
        poison = components.unet.conv_in.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        loss = trainer.train_step(batch)
        poison.remove()

        assert torch.isfinite(torch.tensor(loss)), "the loss itself was fine: only the gradient overflowed"
        assert trainer.progress.skipped_steps == 1
        assert trainer.scaler.get_scale() == SCALE / 2
        assert trainer.optimizer.local_epoch == 0
        assert trainer.optimizer.tracker.local_progress.samples_accumulated == 0, "hivemind must not count it"
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.trainable, strict=True))

        trainer.train_step(batch)  # the next good step goes through
        assert trainer.optimizer.local_epoch == 1 and trainer.progress.skipped_steps == 1
        assert not torch.equal(before[0], trainer.trainable[0])


def test_without_a_scaler_an_inf_gradient_is_caught_too(config, tmp_path):
    """fp32 and bf16 have no GradScaler: the trainer checks the gradient itself before hivemind sees it. bf16 on
    CPU trains in fp32 (no autocast), like fp16 does. The latent cache is wired through the same settings."""
    bf16 = config.model_copy(update={"fp16": False, "train": config.train.model_copy(
        update={"mixed_precision": "bf16", "cache_latents": True})})
    assert bf16.precision == "bf16"
    batch = first_batch(config)
    components = load_components(TINY_MODEL_ID)
    with one_peer(bf16, components, tmp_path, max_grad_norm=1.0) as trainer:
        assert not trainer.scaler.is_enabled() and trainer.autocast_dtype is None
        before = [p.detach().clone() for p in trainer.trainable]
        poison = components.unet.conv_in.weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        trainer.train_step(batch)
        poison.remove()
        assert trainer.progress.skipped_steps == 1 and trainer.optimizer.local_epoch == 0
        assert trainer.optimizer.tracker.local_progress.samples_accumulated == 0
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.trainable, strict=True))

        trainer.train_step(batch)
        assert trainer.optimizer.local_epoch == 1 and trainer.progress.skipped_steps == 1
        # the same 4 images twice: the VAE ran on each once
        assert trainer.latent_cache.images_encoded == len(batch.captions) == len(trainer.latent_cache)


def test_trainable_parameters_stay_float32_because_hivemind_fp16_compression_refuses_bf16():
    tensor = torch.ones(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        Float16Compression().compress(tensor, CompressionInfo.from_tensor(tensor))
    components = load_components(TINY_MODEL_ID)
    components.unet.to(torch.bfloat16)  # as if someone loaded it in half precision
    with pytest.raises(RuntimeError, match="float32"):
        prepare_model(components, device=torch.device("cpu"), train_text_encoder=False, precision="bf16")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_eval_loss_and_samples_work_with_frozen_parts_in_half_precision(half):
    """On CUDA the frozen VAE and text encoder run in fp16/bf16 while the UNet stays fp32 (prepare_model):
    simulated on CPU. Before the fix both failed on a dtype mismatch, outside the trainer's autocast."""
    from types import SimpleNamespace

    from sdswarm.train.samples import render_grid
    from sdswarm.train.step import fixed_seed_loss

    components = load_components(TINY_MODEL_ID)
    components.vae.to(half)
    components.text_encoder.to(half)
    encoder = PromptEncoder(components.tokenizer, components.text_encoder)
    batch = SimpleNamespace(pixels=torch.rand(2, 3, 64, 64) * 2 - 1, captions=["circle", "square"])
    loss = fixed_seed_loss(components.unet, components.vae, components.noise_scheduler, encoder, [batch], seed=0)
    assert torch.isfinite(torch.tensor(loss))
    grid = render_grid(components, encoder, ["circle"], width=64, height=64, steps=2, guidance=7.0, seed=0)
    assert grid.size == (64, 64)
