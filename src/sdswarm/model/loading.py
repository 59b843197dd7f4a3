"""Load the Stable Diffusion parts we fine-tune, from the hub, a local folder, or the built-in tiny model
(built once into the cache by model/tiny.py)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import CLIPTextModel, CLIPTokenizer

from sdswarm.model.tiny import TINY_MODEL_DIRNAME, build_tiny_model

log = logging.getLogger(__name__)

TINY_MODEL_ID = "builtin:tiny"
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
            log.info("building the tiny model (first run only: trains its VAE, about half a minute) into %s", path)
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
    built once into `cache_dir / TINY_MODEL_DIRNAME` (cache_dir defaults to default_cache_dir()); for hub ids
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
