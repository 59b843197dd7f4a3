"""Export a LoRA checkpoint as a file other tools load.

- `kohya`: one .safetensors in kohya's layout (`lora_unet_…`, `lora_te_…`, `.lora_down.weight`, `.lora_up.weight`,
  `.alpha`), what A1111 and ComfyUI load for SD 1.x;
- `diffusers`: diffusers' own LoRA file (`StableDiffusionPipeline.load_lora_weights`), with its LoRA-config metadata;
- merged: the base with the adapters folded in, as one original-layout SD file (export.save_single_file).

The adapters are rebuilt exactly as training built them (the checkpoint's train.lora on the base its config names),
after checking that the base is still the one they were trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from sdswarm.atomic import atomic_path
from sdswarm.config import LoraConfig
from sdswarm.model.ema import EMA
from sdswarm.model.loading import SDComponents, load_components
from sdswarm.model.lora import (
    ADAPTER_FILE,
    BaseIdentity,
    adapter_state,
    add_adapters,
    base_identity,
    check_base,
    load_adapters,
    merge_adapters,
    read_base,
    to_kohya,
    write_adapter_file,
)
from sdswarm.train.checkpoint import STATE_FILE, load_training_state
from sdswarm.train.export import save_single_file

log = logging.getLogger(__name__)

LoraFormat = Literal["kohya", "diffusers"]


def is_lora_checkpoint(checkpoint_dir: str | Path) -> bool:
    return (Path(checkpoint_dir) / ADAPTER_FILE).is_file()


def load_lora_checkpoint(checkpoint_dir: str | Path, *, model: str, lora: LoraConfig, text_encoder: bool,
                         use_ema: bool) -> tuple[SDComponents, BaseIdentity]:
    """The base from `model` with the checkpoint's adapters on it (their EMA with `use_ema`), in fp32 on the CPU."""
    checkpoint_dir = Path(checkpoint_dir)
    trained_on = read_base(checkpoint_dir)
    try:
        components = load_components(model)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the base model {model!r} this LoRA checkpoint was trained on: {exc}") from None
    base = base_identity(model, components)
    check_base(base, trained_on, f"checkpoint {checkpoint_dir}")
    params = add_adapters(components, lora, text_encoder=text_encoder, seed=0)
    load_adapters(components, checkpoint_dir)
    if use_ema:
        state = load_training_state(checkpoint_dir) if (checkpoint_dir / STATE_FILE).is_file() else {}
        if state.get("ema") is None:
            raise ValueError(f"{checkpoint_dir} holds no EMA of the adapters (the run had use_ema: False); "
                             "export without --ema")
        ema = EMA(params, decay=float(state["ema"]["decay"]))
        ema.load_state_dict(state["ema"])  # checks every shape
        ema.copy_to(params)
    for module in (components.unet, components.text_encoder, components.vae):
        module.eval().requires_grad_(False)
    return components, base


def export_lora(components: SDComponents, base: BaseIdentity, out_path: str | Path, *, fmt: LoraFormat, alpha: float,
                metadata: dict[str, str] | None = None) -> Path:
    """Write the adapters in memory as one file in `fmt`, beside its final name first and renamed into place."""
    out_path = Path(out_path)
    if fmt == "diffusers":
        return write_adapter_file(components, out_path, base)
    if fmt != "kohya":
        raise ValueError(f"unknown LoRA format {fmt!r}: kohya or diffusers")
    tensors = to_kohya(adapter_state(components), alpha)
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_alpha": f"{alpha:g}",
                "ss_network_dim": str(_rank(tensors)), "ss_base_model_version": "sd_v1",
                "sdswarm.base_model": base.model, "sdswarm.base_sha256": base.sha256, **(metadata or {})}
    with atomic_path(out_path, durable=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out_path


def _rank(kohya: dict[str, torch.Tensor]) -> int:
    return next(v.shape[0] for k, v in kohya.items() if k.endswith(".lora_down.weight"))


def export_lora_checkpoint(checkpoint_dir: str | Path, out_path: str | Path, *, model: str, lora: LoraConfig,
                           text_encoder: bool, use_ema: bool = False, fmt: LoraFormat = "kohya", merge: bool = False,
                           half: bool = False) -> Path:
    """`sdswarm export` for a LoRA checkpoint: the adapters as `fmt`, or with `merge` the merged model as one
    original-layout file (`half`: fp16)."""
    checkpoint_dir = Path(checkpoint_dir)
    components, base = load_lora_checkpoint(checkpoint_dir, model=model, lora=lora, text_encoder=text_encoder,
                                            use_ema=use_ema)
    metadata = {"sdswarm.checkpoint": checkpoint_dir.name, "sdswarm.ema": str(use_ema).lower()}
    if merge:
        merge_adapters(components)
        metadata["sdswarm.base_model"] = base.model
        path = save_single_file(components, out_path, half=half, metadata=metadata)
    else:
        path = export_lora(components, base, out_path, fmt=fmt, alpha=lora.scale_alpha, metadata=metadata)
    log.info("exported %s (%s adapters%s) to %s", checkpoint_dir, "EMA" if use_ema else "trained",
             ", merged into the base" if merge else f", {fmt} layout", path)
    return path

