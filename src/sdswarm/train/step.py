"""The loss of one batch: Stable Diffusion noise-prediction training, as in diffusers' text-to-image example."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from sdswarm.config import Precision


def half_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype (autocast, frozen parts): on CUDA only; None means fp32 throughout."""
    if device.type != "cuda":
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Images in [-1, 1] -> latents sampled from the VAE posterior, scaled by the VAE's scaling factor."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    return scaled_sample(vae, vae.encode(pixels).latent_dist, generator)


def scaled_sample(vae: AutoencoderKL, posterior, generator: torch.Generator | None) -> torch.Tensor:
    """A draw from the VAE's posterior, in fp32, scaled by the VAE's scaling factor: what the UNet trains on."""
    return posterior.sample(generator=generator).float() * vae.config.scaling_factor


def snr(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of each timestep: alpha_bar_t / (1 - alpha_bar_t)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023), as diffusers' train_text_to_image has them:
    min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v-prediction targets."""
    ratio = snr(noise_scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clipped / ratio
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    raise ValueError(f"min-SNR weighting needs an epsilon or v_prediction scheduler, not {prediction_type!r}")


def diffusion_loss(
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    generator: torch.Generator | None,
    *,
    min_snr_gamma: float | None = None,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """MSE between the UNet's prediction and the target the scheduler was trained for, in fp32.

    noise_offset: noise += offset * randn(b, c, 1, 1), as in diffusers (the target is the offset noise).
    min_snr_gamma: weight each sample's MSE by min_snr_weights. With both off, nothing extra is drawn from
    `generator`, so the default step is the textbook one."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
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
    if min_snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=list(range(1, target.ndim)))
    return (per_sample * min_snr_weights(noise_scheduler, timesteps, min_snr_gamma)).mean()


@torch.no_grad()
def fixed_seed_loss(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    noise_scheduler: DDPMScheduler,
    encode_prompts,
    batches,
    seed: int,
) -> float:
    """Mean loss over the given batches with noise and timesteps from a fixed seed: comparable across a run
    (and across runs: plain MSE, whatever weighting or noise offset training uses)."""
    generator = torch.Generator(unet.device).manual_seed(seed)
    was_training = unet.training
    unet.eval()
    try:
        losses = [
            # a frozen text encoder may be in half precision (fp16/bf16 on CUDA) while the UNet is fp32
            diffusion_loss(unet, noise_scheduler, encode_latents(vae, b.pixels, generator),
                           encode_prompts(b.captions).to(unet.dtype), generator).item()
            for b in batches
        ]
    finally:
        unet.train(was_training)
    return sum(losses) / len(losses)
