"""Load the Stable Diffusion parts we fine-tune, from the hub, a local folder, or the built-in tiny model."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_MODEL_ID = "builtin:tiny"
# Bump the suffix whenever the tiny recipe changes, so stale caches are not reused.
TINY_MODEL_DIRNAME = "tiny-sd-v1"
TOKENIZER_ASSETS = Path(__file__).resolve().parent / "tiny_tokenizer"
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class SDComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler


def default_cache_dir() -> Path:
    """$SDSWARM_CACHE, else $XDG_CACHE_HOME/sdswarm, else ~/.cache/sdswarm."""
    if env := os.environ.get("SDSWARM_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "sdswarm"
    return Path.home() / ".cache" / "sdswarm"


def tiny_tokenizer() -> CLIPTokenizer:
    """The embedded 2048-token CLIP BPE tokenizer (see tools/make_tiny_tokenizer.py)."""
    return CLIPTokenizer(
        str(TOKENIZER_ASSETS / "vocab.json"), str(TOKENIZER_ASSETS / "merges.txt"), model_max_length=77
    )


def _tiny_pipeline(seed: int) -> StableDiffusionPipeline:
    tokenizer = tiny_tokenizer()
    # fork_rng: deterministic weights without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32,
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
        # Two blocks -> one 2x downsample: 64 px images <-> 32x32 latents, like SD's 8x at 512 px.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            sample_size=64,
            scaling_factor=0.18215,
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
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
        prediction_type="epsilon",
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


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write the tiny SD pipeline at `path` atomically; if another builder won the race, keep theirs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the final folder should be readable like any cache dir
    try:
        _tiny_pipeline(seed).save_pretrained(tmp, safe_serialization=True)
        # transformers 5 writes only tokenizer.json; add the BPE files too, as in SD 1.x hub folders.
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER_ASSETS / name, tmp / "tokenizer" / name)
        try:
            # rename is atomic and refuses to replace a non-empty dir, so readers never see a partial folder.
            os.rename(tmp, path)
        except OSError:
            if not (path / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _is_local(model: str) -> bool:
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or "\\" in model:
        return True
    try:
        validate_repo_id(model)
    except HFValidationError:
        return True  # not a valid hub id, so it can only have meant a path
    return False


def _resolve(model: str, cache_dir: Path | None) -> tuple[str, Path | None]:
    """Return what to pass to from_pretrained, plus the hub cache dir (None for local folders)."""
    if model == TINY_MODEL_ID:
        path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / TINY_MODEL_DIRNAME
        if not (path / "model_index.json").exists():
            build_tiny_model(path)
        return str(path), None
    if not _is_local(model):
        return model, cache_dir
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist (expected a diffusers folder or hub id)")
    if not path.is_dir():
        raise ValueError(f"model path {path} is not a folder (expected a diffusers Stable Diffusion folder)")
    missing = [sub for sub in SUBFOLDERS if not (path / sub).is_dir()]
    if missing:
        raise ValueError(
            f"{path} is not a diffusers Stable Diffusion folder: missing subfolder(s) {', '.join(missing)} "
            f"(expected {', '.join(SUBFOLDERS)}, e.g. from StableDiffusionPipeline.save_pretrained)"
        )
    return str(path), None


def load_components(model: str, cache_dir: Path | None = None) -> SDComponents:
    """Load unet, vae, text encoder, tokenizer and DDPM noise scheduler in fp32.

    `model` is a hub id, a local diffusers folder, or TINY_MODEL_ID. For TINY_MODEL_ID the tiny model is
    built once into `cache_dir / "tiny-sd-v1"` (cache_dir defaults to default_cache_dir()); for hub ids
    `cache_dir` is passed on as the hub download cache (None: the usual HF cache).
    """
    source, hub_cache = _resolve(model, cache_dir)
    kw: dict = {"cache_dir": hub_cache} if hub_cache is not None else {}
    return SDComponents(
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32, **kw),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **kw),
        # transformers 5 defaults to dtype="auto" (the checkpoint's dtype), so ask for fp32 explicitly.
        text_encoder=CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", dtype=torch.float32, **kw
        ),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
        noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
    )
