"""Which attention kernel the UNet and VAE run (`train.attention`).

"default" leaves the processors diffusers loads the model with (PyTorch's scaled_dot_product_attention on
torch 2, so it is already memory-efficient); "sdpa" sets that processor explicitly; "xformers" uses
xformers' memory-efficient kernels and needs the xformers package (and a CUDA GPU). The choice changes
speed and memory only, not the math: results agree to rounding.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin

ATTENTION_CHOICES = ("default", "sdpa", "xformers")


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def set_attention(models: Iterable[ModelMixin], choice: str) -> None:
    """Apply the attention choice to every attention layer of `models` (e.g. the UNet and the VAE)."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"train.attention {choice!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "default":
        return
    if choice == "xformers" and not xformers_available():
        raise RuntimeError(
            "train.attention: xformers, but the xformers package is not installed. Install the build that matches "
            "your torch and CUDA (pip install xformers), or use train.attention: sdpa (PyTorch's own "
            "memory-efficient attention, no extra package)"
        )
    for model in models:
        if choice == "sdpa":
            model.set_attn_processor(AttnProcessor2_0())
        else:
            model.enable_xformers_memory_efficient_attention()
