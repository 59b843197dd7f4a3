"""The built-in tiny Stable Diffusion (`model: builtin:tiny`): SD 1.5's architecture shrunk to train in seconds
on a CPU, with a VAE and a text encoder trained at build time on demo-like images and captions, as SD's come
pretrained: samples decode to pictures, and captions that swap two colours mean different things."""

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
from sdswarm.data.captions import caption_from_post
from sdswarm.data.demo import SIZES, plan_post, post_json, render
from sdswarm.data.loader import to_tensor
from sdswarm.model.text import PromptEncoder

# Bump the suffix whenever the tiny recipe changes, so stale caches are not reused.
TINY_MODEL_DIRNAME = "tiny-sd-v6"
TOKENIZER_ASSETS = Path(__file__).resolve().parent / "tiny_tokenizer"

# The tiny VAE is trained at build time on demo-like images, so samples decode to pictures, not noise.
TINY_VAE_STEPS = 800
TINY_VAE_BATCH = 16
TINY_VAE_CROP = 32  # px; convolutions do not care about the size, and crops are 4x cheaper than 64 px images
TINY_VAE_LR = 5e-3
TINY_VAE_KL_WEIGHT = 1e-4  # per latent element, against a per-pixel L1: just enough to keep latents smooth
TINY_VAE_IMAGES = 256
BUILD_POST_OFFSET = 1_000_000  # post ids the VAE and text encoder learn from: none of them is in the demo data set
# ... drawn at generator version 3's sizes (57 % non-square): a VAE trained on version 4's mostly square posts
# reconstructed them worse (mean abs error 0.129 on a 0..2 scale) than one trained on version 3's (0.073)
BUILD_SIZES = tuple((size, 4 if size == (64, 64) else weight) for size, weight in SIZES)
# SD's text encoder comes pretrained (CLIP); ours learns at build time to tell which tags a caption holds, so
# "red circle, blue background" and "blue circle, red background" differ before the demo trains the UNet.
TINY_TEXT_STEPS = 400
TINY_TEXT_BATCH = 64
TINY_TEXT_LR = 3e-3
TINY_TEXT_CAPTIONS = 2000
# Float reductions split work by thread count, so a fixed count gives every peer the same VAE and text encoder (on the
# same CPU kind). One: layers this small barely speed up with more, and a busy machine does not stall it.
TINY_BUILD_THREADS = 1


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
    for post_id in range(BUILD_POST_OFFSET, BUILD_POST_OFFSET + count):
        image = resize_to_aspect_bucket(render(plan_post(post_id, seed, BUILD_SIZES)), rng.choice(buckets))
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
    """Fit `vae` to demo-like images (L1 on crops and on blends of their latents, a little KL), then set
    scaling_factor to 1 / std of their latents.

    Call it under fork_rng with the global seed set: the weights then depend on the seed alone."""
    images = tiny_vae_images(seed, TINY_VAE_IMAGES)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=TINY_VAE_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, TINY_VAE_LR, total_steps=max(steps, 1), pct_start=0.1)
    vae.train().to(memory_format=torch.channels_last)  # oneDNN's faster layout for few channels (~25%)
    with _torch_threads(TINY_BUILD_THREADS):
        for _ in range(steps):
            crops = []
            for index in torch.randint(len(images), (TINY_VAE_BATCH,), generator=generator).tolist():
                image = images[index]
                top = int(torch.randint(image.shape[1] - TINY_VAE_CROP + 1, (1,), generator=generator))
                left = int(torch.randint(image.shape[2] - TINY_VAE_CROP + 1, (1,), generator=generator))
                crops.append(image[:, top : top + TINY_VAE_CROP, left : left + TINY_VAE_CROP])
            batch = torch.stack(crops).contiguous(memory_format=torch.channels_last)
            posterior = vae.encode(batch).latent_dist
            latents = posterior.sample(generator=generator)
            reconstruction = vae.decode(latents).sample
            kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
            # A blend of two crops' latents decodes to the blend of their pixels: an uncertain prediction of the
            # UNet (a mean of latents) then looks like a mean of colours, not like a third colour of the palette.
            weight = torch.rand(len(batch), 1, 1, 1, generator=generator)
            other = torch.roll(torch.arange(len(batch)), 1)
            blend = vae.decode(weight * latents + (1 - weight) * latents[other]).sample
            blend_error = (blend - (weight * batch + (1 - weight) * batch[other])).abs().mean()
            loss = (reconstruction - batch).abs().mean() + blend_error + TINY_VAE_KL_WEIGHT * kl
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


def tiny_text_captions(seed: int, count: int) -> tuple[list[str], list[list[str]]]:
    """Demo-style captions, as the trainer makes them from posts, and each one's general tags."""
    posts = [post_json(plan_post(post_id, seed, BUILD_SIZES), md5="0" * 32)
             for post_id in range(BUILD_POST_OFFSET, BUILD_POST_OFFSET + count)]
    return [caption_from_post(post) for post in posts], [post["tag_string_general"].split() for post in posts]


def _train_tiny_text_encoder(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, seed: int, steps: int) -> None:
    """Teach `text_encoder` which tags a caption holds: a linear probe on its mean hidden state (last and
    penultimate layer, as `clip_penultimate` picks either) predicts each tag; the probe is thrown away.

    Call it under fork_rng with the global seed set: the weights then depend on the seed alone."""
    captions, tags = tiny_text_captions(seed, TINY_TEXT_CAPTIONS)
    vocabulary = sorted({tag for post_tags in tags for tag in post_tags})
    column = {tag: i for i, tag in enumerate(vocabulary)}
    targets = torch.zeros(len(captions), len(vocabulary))
    for row, post_tags in enumerate(tags):
        targets[row, [column[tag] for tag in post_tags]] = 1.0
    encoder = PromptEncoder(tokenizer, text_encoder)
    input_ids = encoder.tokenize(captions)
    probe = torch.nn.Linear(text_encoder.config.hidden_size, len(vocabulary))
    optimizer = torch.optim.AdamW([*text_encoder.parameters(), *probe.parameters()], lr=TINY_TEXT_LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    text_encoder.train()
    with _torch_threads(TINY_BUILD_THREADS):
        for _ in range(steps):
            rows = torch.randint(len(captions), (TINY_TEXT_BATCH,), generator=generator)
            loss = torch.zeros(())
            for penultimate in (False, True):
                encoder.clip_penultimate = penultimate
                pooled = encoder.encode(input_ids[rows]).mean(dim=1)
                loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(probe(pooled), targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    text_encoder.eval()


def _tiny_pipeline(seed: int, vae_steps: int, text_steps: int) -> StableDiffusionPipeline:
    tokenizer = tiny_tokenizer()
    # fork_rng: deterministic weights without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Three levels (16x16, 8x8, 4x4 latents), cross-attention at the two lower ones. With two levels the demo drew
        # a blob of the right colours whatever the shape: a UNet has no position input, its convolutions learn where
        # they are from the picture's edges, and the 4x4 level sees all of it. The same time per step as two levels.
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
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
        _train_tiny_text_encoder(text_encoder, tokenizer, seed, text_steps)
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


def build_tiny_model(
    path: Path, seed: int = 0, vae_steps: int = TINY_VAE_STEPS, text_steps: int = TINY_TEXT_STEPS
) -> Path:
    """Write the tiny SD pipeline at `path` atomically; if another builder won the race, keep theirs.

    `vae_steps` and `text_steps` train the VAE and the text encoder (tens of seconds each by default); tests pass
    fewer."""
    path = Path(path)
    with atomic_path(path, replace=False) as tmp:  # readers never see a partial folder
        _tiny_pipeline(seed, vae_steps, text_steps).save_pretrained(tmp, safe_serialization=True)
        # transformers 5 writes only tokenizer.json; add the BPE files too, as in SD 1.x hub folders.
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER_ASSETS / name, tmp / "tokenizer" / name)
    return path
