"""Sample grids: fixed prompts, fixed seed, rendered with the weights being trained."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.utils import make_image_grid
from PIL import Image

from sdswarm.atomic import atomic_path
from sdswarm.model.loading import SDComponents
from sdswarm.model.text import PromptEncoder
from sdswarm.train.checkpoint import as_pipeline


@torch.no_grad()
def render_grid(
    components: SDComponents,
    encoder: PromptEncoder,
    prompts: Sequence[str],
    *,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    seed: int,
) -> Image.Image:
    """One image per prompt, side by side. Prompts go through the training's own encoder
    (long-prompt chunks, penultimate layer), so samples show what training conditions on."""
    scheduler = DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config)
    pipeline = as_pipeline(components, scheduler)
    pipeline.set_progress_bar_config(disable=True)
    # encode prompts and empty negatives in one batch so both get the same number of chunks
    embeddings = encoder([*prompts, *[""] * len(prompts)])
    prompt_embeds, negative_embeds = embeddings.chunk(2)
    was_training = components.unet.training, components.text_encoder.training
    components.unet.eval()
    components.text_encoder.eval()
    # the frozen VAE may be in half precision (fp16/bf16 on CUDA) while the UNet is fp32: decoding needs autocast
    half_vae = components.vae.dtype != components.unet.dtype
    try:
        with torch.autocast(components.unet.device.type, dtype=components.vae.dtype, enabled=half_vae):
            images = pipeline(
                prompt_embeds=prompt_embeds.to(components.unet.dtype),
                negative_prompt_embeds=negative_embeds.to(components.unet.dtype),
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator(device="cpu").manual_seed(seed),
            ).images
    finally:
        components.unet.train(was_training[0])
        components.text_encoder.train(was_training[1])
    columns = min(len(images), 4)
    rows = -(-len(images) // columns)
    images += [Image.new("RGB", images[0].size, "white")] * (rows * columns - len(images))
    return make_image_grid(images, rows=rows, cols=columns)


def save_image(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically: a reader never sees half a file."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
