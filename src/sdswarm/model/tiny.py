"""The built-in tiny Stable Diffusion (`model: builtin:tiny`): SD 1.5's architecture shrunk to train in seconds
on a CPU, with a VAE trained at build time on demo-like images so that samples decode to pictures."""

from __future__ import annotations

import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdswarm.atomic import atomic_path
from sdswarm.data.aspect import AspectBucket, resize_to_aspect_bucket
from sdswarm.data.demo import plan_post, render
from sdswarm.data.loader import to_tensor

# Bump the suffix whenever the tiny recipe changes, so stale caches are not reused.
TINY_MODEL_DIRNAME = "tiny-sd-v4"
TOKENIZER_ASSETS = Path(__file__).resolve().parent / "tiny_tokenizer"

# The tiny VAE is trained at build time on demo-like images, so samples decode to pictures, not noise.
TINY_VAE_STEPS = 800
TINY_VAE_BATCH = 16
TINY_VAE_CROP = 32  # px; convolutions do not care about the size, and crops are 4x cheaper than 64 px images
TINY_VAE_LR = 5e-3
TINY_VAE_KL_WEIGHT = 1e-4  # per latent element, against a per-pixel L1: just enough to keep latents smooth
TINY_VAE_IMAGES = 256
TINY_VAE_POST_OFFSET = 1_000_000  # post ids of its training images: none of them is in the demo data set
# Float reductions split work by thread count, so a fixed count gives every peer the same VAE (on the same CPU
# kind). One: convolutions this small barely speed up with more, and a busy machine does not stall it.
TINY_VAE_THREADS = 1


def tiny_tokenizer() -> CLIPTokenizer:
    """The embedded 2048-token CLIP BPE tokenizer (see tools/make_tiny_tokenizer.py)."""
    return CLIPTokenizer(
        str(TOKENIZER_ASSETS / "vocab.json"), str(TOKENIZER_ASSETS / "merges.txt"), model_max_length=77
    )


def tiny_vae_images(seed: int, count: int) -> list[torch.Tensor]:
    """Demo-style posts, resized to the tiny config's buckets as the trainer does; (3, H, W) in [-1, 1]."""
    buckets = (AspectBucket(64, 64), AspectBucket(64, 32), AspectBucket(32, 64))
    rng = random.Random(f"sdswarm-tiny-vae:{seed}")
    out = []
    for post_id in range(TINY_VAE_POST_OFFSET, TINY_VAE_POST_OFFSET + count):
        image = resize_to_aspect_bucket(render(plan_post(post_id, seed)), rng.choice(buckets))
        out.append(to_tensor(image))
    return out


@contextmanager
def _torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_tiny_vae(vae: AutoencoderKL, seed: int, steps: int) -> None:
    """Fit `vae` to demo-like images (L1 + a little KL), then set scaling_factor to 1 / std of their latents.

    Call it under fork_rng with the global seed set: the weights then depend on the seed alone."""
    images = tiny_vae_images(seed, TINY_VAE_IMAGES)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=TINY_VAE_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, TINY_VAE_LR, total_steps=max(steps, 1), pct_start=0.1)
    vae.train().to(memory_format=torch.channels_last)  # oneDNN's faster layout for few channels (~25%)
    with _torch_threads(TINY_VAE_THREADS):
        for _ in range(steps):
            crops = []
            for index in torch.randint(len(images), (TINY_VAE_BATCH,), generator=generator).tolist():
                image = images[index]
                top = int(torch.randint(image.shape[1] - TINY_VAE_CROP + 1, (1,), generator=generator))
                left = int(torch.randint(image.shape[2] - TINY_VAE_CROP + 1, (1,), generator=generator))
                crops.append(image[:, top : top + TINY_VAE_CROP, left : left + TINY_VAE_CROP])
            batch = torch.stack(crops).contiguous(memory_format=torch.channels_last)
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample(generator=generator)).sample
            kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
            loss = (reconstruction - batch).abs().mean() + TINY_VAE_KL_WEIGHT * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        vae.eval()
        with torch.no_grad():
            # As SD's 0.18215: scaled latents of the training images have unit variance, as the UNet expects.
            square = torch.stack([im for im in images if im.shape[1:] == (64, 64)][:64])
            latents = vae.encode(square).latent_dist.sample(generator=generator)
    vae.to(memory_format=torch.contiguous_format)  # safetensors saves contiguous tensors only
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))


def _tiny_pipeline(seed: int, vae_steps: int = TINY_VAE_STEPS) -> StableDiffusionPipeline:
    tokenizer = tiny_tokenizer()
    # fork_rng: deterministic weights without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=32,
        )
        # Three blocks -> 4x downsampling: 64 px images <-> 16x16 latents (SD: 512 px <-> 64x64), so the UNet
        # costs a quarter of what 32x32 latents do and the demo sees four times the samples per minute.
        # Kept small (no attention, few channels) so training it takes seconds; one norm group learns far faster.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            norm_num_groups=1,
            mid_block_add_attention=False,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        _train_tiny_vae(vae, seed, vae_steps)
    # SD's betas, rescaled to a zero terminal SNR, with v-prediction and samples starting at the last timestep
    # (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"). With SD 1.5's own
    # schedule the most-noised latents still show the image's mean colour, so a model trained for minutes reads
    # the colours from the noise instead of the prompt, and its samples ignore the prompt.
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_model(path: Path, seed: int = 0, vae_steps: int = TINY_VAE_STEPS) -> Path:
    """Write the tiny SD pipeline at `path` atomically; if another builder won the race, keep theirs.

    `vae_steps` trains the VAE that many steps (tens of seconds by default); tests pass fewer."""
    path = Path(path)
    with atomic_path(path, replace=False) as tmp:  # readers never see a partial folder
        _tiny_pipeline(seed, vae_steps).save_pretrained(tmp, safe_serialization=True)
        # transformers 5 writes only tokenizer.json; add the BPE files too, as in SD 1.x hub folders.
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER_ASSETS / name, tmp / "tokenizer" / name)
    return path
