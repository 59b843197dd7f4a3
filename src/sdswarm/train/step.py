"""The loss of one batch: Stable Diffusion noise-prediction training, as in diffusers' text-to-image example."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Images in [-1, 1] -> latents sampled from the VAE posterior, scaled by the VAE's scaling factor."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.sample(generator=generator)
    return latents.float() * vae.config.scaling_factor


def diffusion_loss(
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """MSE between the UNet's prediction and the target the scheduler was trained for, in fp32."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
        generator=generator, device=latents.device,
    )
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"scheduler prediction_type {prediction_type!r} is not trainable here (epsilon, v_prediction)")
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings).sample
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


@torch.no_grad()
def fixed_seed_loss(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    noise_scheduler: DDPMScheduler,
    encode_prompts,
    batches,
    seed: int,
) -> float:
    """Mean loss over the given batches with noise and timesteps from a fixed seed: comparable across a run."""
    generator = torch.Generator(unet.device).manual_seed(seed)
    was_training = unet.training
    unet.eval()
    try:
        losses = [
            diffusion_loss(unet, noise_scheduler, encode_latents(vae, b.pixels, generator),
                           encode_prompts(b.captions), generator).item()
            for b in batches
        ]
    finally:
        unet.train(was_training)
    return sum(losses) / len(losses)
