"""Our training step through hivemind (one peer) does exactly what a plain PyTorch SD training loop does."""

from __future__ import annotations

import copy

import hivemind
import torch
import torch.nn.functional as F

from sdswarm.config import SwarmConfig
from sdswarm.data.loader import Batch
from sdswarm.model.loading import TINY_MODEL_ID, load_components
from sdswarm.model.text import PromptEncoder
from sdswarm.node import prepare_data, prepare_model
from sdswarm.swarm.network import stop_dht
from sdswarm.swarm.optimizer import make_optimizer
from sdswarm.train.checkpoint import Checkpoints
from sdswarm.train.loop import Trainer

LR, BETAS, EPS, WD, CLIP = 1e-3, (0.9, 0.99), 1e-8, 1e-2, 1.0


def plain_pytorch_steps(components, batches: list[Batch], seed: int) -> None:
    """The textbook loop (diffusers' train_text_to_image, fp32), written out by hand."""
    unet, vae, te, tok, sched = (components.unet, components.vae, components.text_encoder, components.tokenizer,
                                 components.noise_scheduler)
    params = [*unet.parameters(), *te.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        with torch.no_grad():
            latents = vae.encode(batch.pixels).latent_dist.sample(generator=generator) * vae.config.scaling_factor
        ids = tok(batch.captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        embeddings = te(ids).last_hidden_state
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        prediction = unet(sched.add_noise(latents, noise, timesteps), timesteps, embeddings).sample
        # diffusers' target: the noise (epsilon) or the velocity (the tiny model is v-prediction)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
        F.mse_loss(prediction, target).backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad()


def test_step_through_hivemind_equals_plain_pytorch_loop(tiny_config, tmp_path):
    config = tiny_config.model_copy(update={"ucg": 0.0, "extended_chunks": 1, "clip_penultimate": False,
                                            "train_text_encoder": True, "seed": 7})
    stream = prepare_data(config)
    iterator = stream.iterate()
    batches = [next(iterator)[2] for _ in range(3)]

    ours = load_components(TINY_MODEL_ID)
    reference = copy.deepcopy(ours)
    trainable = prepare_model(ours, device=torch.device("cpu"), train_text_encoder=True)
    for module in (reference.unet, reference.text_encoder):
        module.train()

    dht = hivemind.DHT(start=True)
    optimizer = make_optimizer(
        dht=dht, params=trainable, batch_size_per_step=4, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
        max_grad_norm=CLIP, verbose=False,
        # one local step reaches the target batch: every step is a global optimizer step
        swarm=SwarmConfig(target_batch_size=4, matchmaking_time=1, averaging_timeout=5, compression="none"),
    )
    try:
        trainer = Trainer(
            components=ours, encoder=PromptEncoder(ours.tokenizer, ours.text_encoder), trainable=trainable,
            ema=None, latent_cache=None, stream=stream, optimizer=optimizer,
            checkpoints=Checkpoints(tmp_path / "ckpt", keep=1), device=torch.device("cpu"), train=config.train,
            output=config.output.model_copy(update={"dir": tmp_path}), precision=config.precision, ucg=config.ucg,
            resolution=config.resolution, seed=config.seed,
        )
        ours.unet.train()
        ours.text_encoder.train()
        for batch in batches:
            trainer.train_step(batch)
        assert optimizer.local_epoch == 3, "each step should have been one optimizer step"
    finally:
        optimizer.shutdown()
        stop_dht(dht)

    plain_pytorch_steps(reference, batches, seed=7)
    for name, module in (("unet", "unet"), ("text encoder", "text_encoder")):
        got = dict(getattr(ours, module).named_parameters())
        for key, expected in getattr(reference, module).named_parameters():
            # bit-for-bit in practice; a hair of tolerance for BLAS kernels that may sum in another order
            torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-7, msg=f"{name} {key} differs")
    # and training really moved the weights
    untouched = load_components(TINY_MODEL_ID)
    assert not torch.equal(untouched.unet.conv_in.weight, ours.unet.conv_in.weight)
