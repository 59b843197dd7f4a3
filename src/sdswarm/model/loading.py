"""Load the Stable Diffusion parts we fine-tune, from the hub, a local folder, or the built-in tiny model
(built once into the cache by model/tiny.py)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import CLIPTextModel, CLIPTokenizer

from sdswarm.config import ConfigError
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
            log.info("building the tiny model (first run only: trains its VAE and text encoder, 1-2 minutes) into %s",
                     path)
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


# Hub ids withdrawn by their owners, and where a maintained copy lives.
MAINTAINED_COPIES = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


class ModelUnavailable(ConfigError):
    """The model cannot be loaded; one message names it, what was tried and what to do."""


def check_model(model: str) -> None:
    """Fail fast, before any swarm or data work, when `model` cannot be loaded: a local folder that is not a
    diffusers SD folder, or a hub id the hub does not know (or cannot be asked about, with nothing cached)."""
    if model == TINY_MODEL_ID:
        return
    if _is_local(model):
        try:
            _resolve(model, None)
        except (FileNotFoundError, ValueError) as exc:
            raise ModelUnavailable(f"model: {exc}") from None
        return
    copy = MAINTAINED_COPIES.get(model)
    hint = (f"; {model} was withdrawn from the hub by its owner: a maintained copy is {copy} "
            f"(--set model={copy}, or model: \"{copy}\" in the config)") if copy else ""
    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return  # in the local hub cache: loads without asking the hub
    try:  # one question, no retries: the pipeline's index file, which from_pretrained reads first anyway
        get_hf_file_metadata(hf_hub_url(model, "model_index.json"))
    except GatedRepoError:
        raise ModelUnavailable(f"model {model}: the hub says it is gated: accept its terms on "
                               f"https://huggingface.co/{model} and log in (hf auth login), then start again"
                               ) from None
    except RepositoryNotFoundError:
        raise ModelUnavailable(f"model {model}: the Hugging Face hub has no such repository (asked for "
                               f"{model}/model_index.json){hint or '; check the id, or give a local diffusers folder'}"
                               ) from None
    except EntryNotFoundError:
        raise ModelUnavailable(f"model {model}: the repository has no model_index.json, so it is not a diffusers "
                               "Stable Diffusion pipeline; give an SD 1.x diffusers repository or folder") from None
    except (RevisionNotFoundError, HfHubHTTPError) as exc:
        raise ModelUnavailable(f"model {model}: the hub answered {model}/model_index.json with: {exc}{hint}") from None
    except Exception as exc:  # no connection (the hub client's transport errors), offline mode
        raise ModelUnavailable(
            f"model {model}: the Hugging Face hub cannot be reached ({type(exc).__name__}: {exc}) and the model is "
            f"not in the local hub cache (tried {model}/model_index.json): connect this machine to the internet, "
            f"or point model at a local diffusers folder (--set model=/path/to/folder){hint}") from None


def load_components(model: str, cache_dir: Path | None = None) -> SDComponents:
    """Load unet, vae, text encoder, tokenizer and DDPM noise scheduler in fp32.

    `model` is a hub id, a local diffusers folder, or TINY_MODEL_ID. For TINY_MODEL_ID the tiny model is
    built once into `cache_dir / TINY_MODEL_DIRNAME` (cache_dir defaults to default_cache_dir()); for hub ids
    `cache_dir` is passed on as the hub download cache (None: the usual HF cache).
    """
    source, hub_cache = _resolve(model, cache_dir)
    kw: dict = {"cache_dir": hub_cache} if hub_cache is not None else {}
    # weights from safetensors only: a pickled .bin (or .ckpt) can run code when loaded, and `model` may have been
    # named by a relay
    weights = {"use_safetensors": True, **kw}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32, **weights)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **weights)
        # transformers 5 defaults to dtype="auto" (the checkpoint's dtype), so ask for fp32 explicitly.
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32, **weights)
    except OSError as exc:  # diffusers and transformers: no such weights file (EnvironmentError)
        raise ModelUnavailable(
            f"model {model}: {exc}. sdswarm loads weights from .safetensors files only (pickled .bin files can run "
            "code when loaded): convert the model, e.g. load it once with diffusers and save_pretrained it") from None
    return SDComponents(
        unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
        noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
    )
