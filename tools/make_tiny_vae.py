"""Train the tiny model's VAE once, on demo-style images, and write it into the package (run from the repo root):

    PYTHONPATH=src python tools/make_tiny_vae.py [--steps 4000] [--out src/sdswarm/model/tiny_vae]

A 4x-downsampling AutoencoderKL (64 px images <-> 16x16x4 latents), small enough to ship (about 1 MB of
safetensors) and good enough that a sample decodes to flat colours and clean shapes, so the demo's grid shows
what the UNet learned. The images are posts the demo data set never contains (ids from 1,000,000 on).
Deterministic for a given seed, thread count and CPU kind; the shipped file is what every peer loads, so
peers agree on it whatever their machine.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image

from sdswarm.data.demo import plan_post, render

POST_OFFSET = 1_000_000  # none of these ids is in the demo data set (posts 1..count)
SIDES = (32, 64, 96)  # the tiny config's aspect-bucket sides
CROP = 32  # px: convolutions do not care about the size, and 32 px crops are 4x cheaper than 64 px images
KL_WEIGHT = 1e-5  # per latent element, against a per-pixel L1: just enough to keep latents smooth


def tiny_vae() -> AutoencoderKL:
    """Three blocks -> two 2x downsamples; one norm group and no attention train far faster at this size."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        mid_block_add_attention=False,
        sample_size=64,
    )


def training_images(seed: int, count: int) -> list[torch.Tensor]:
    """Demo posts resized to cover a bucket-like size and centre-cropped, as the trainer sees them; [-1, 1]."""
    rng = random.Random(f"sdswarm-tiny-vae:{seed}")
    out = []
    for post_id in range(POST_OFFSET, POST_OFFSET + count):
        image = render(plan_post(post_id, seed))
        width, height = rng.choice(SIDES), rng.choice(SIDES)
        scale = max(width / image.width, height / image.height)
        resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                               Image.BICUBIC)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        crop = resized.crop((left, top, left + width, top + height))
        pixels = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
        out.append(pixels.permute(2, 0, 1).float() / 127.5 - 1.0)
    return out


def train(vae: AutoencoderKL, images: list[torch.Tensor], steps: int, batch: int, lr: float, seed: int) -> None:
    """L1 + a little KL on random crops, then scaling_factor = 1 / std of the latents of 64 px images."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    vae.train().to(memory_format=torch.channels_last)  # oneDNN's faster layout for few channels (~25%)
    started = time.monotonic()
    for step in range(1, steps + 1):
        crops = []
        for index in torch.randint(len(images), (batch,), generator=generator).tolist():
            image = images[index]
            top = int(torch.randint(image.shape[1] - CROP + 1, (1,), generator=generator))
            left = int(torch.randint(image.shape[2] - CROP + 1, (1,), generator=generator))
            crops.append(image[:, top : top + CROP, left : left + CROP])
        pixels = torch.stack(crops).contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        l1 = (reconstruction - pixels).abs().mean()
        loss = l1 + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            print(f"step {step}/{steps}  L1 {l1.item():.4f}  KL {kl.item():.2f}  {time.monotonic() - started:.0f} s",
                  flush=True)
    vae.eval()
    with torch.no_grad():
        # As SD's 0.18215: scaled latents of the training images have unit variance, as the UNet expects.
        square = torch.stack([im for im in images if im.shape[1:] == (64, 64)][:64])
        latents = vae.encode(square).latent_dist.sample(generator=generator)
        error = (vae.decode(vae.encode(square).latent_dist.mode()).sample - square).abs().mean().item()
    vae.to(memory_format=torch.contiguous_format)  # safetensors saves contiguous tensors only
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    print(f"scaling_factor {vae.config.scaling_factor}; mean L1 reconstruction error of 64 px images {error:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("src/sdswarm/model/tiny_vae"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vae = tiny_vae()
    print(f"{sum(p.numel() for p in vae.parameters()):,} parameters")
    train(vae, training_images(args.seed, args.images), args.steps, args.batch, args.lr, args.seed)
    vae.save_pretrained(args.out, safe_serialization=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
