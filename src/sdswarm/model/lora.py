"""LoRA adapters on a frozen Stable Diffusion base: add them, list what trains, save and load them, name the base.

Adapters are peft's, added through diffusers' and transformers' own adapter API (`unet.add_adapter`,
`text_encoder.add_adapter`). Every peer draws their initial weights from the run seed, so a swarm starts from one
set of adapters without a download; hivemind is handed only the adapter tensors. Adapters averaged over different
bases are garbage, so the base is named by a hash of its weights (`BaseIdentity`) and compared wherever adapters
meet a base: joining a swarm, resuming, exporting.

A LoRA checkpoint holds `pytorch_lora_weights.safetensors` (diffusers' own layout: what
`StableDiffusionPipeline.load_lora_weights` loads; fp16, as LoRA files are shared) and `base_model.json`; the base
stays where `model` says.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import torch
from diffusers import StableDiffusionPipeline
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from sdswarm.atomic import atomic_path, write_atomic
from sdswarm.config import ConfigError, LoraConfig
from sdswarm.model.loading import SDComponents

log = logging.getLogger(__name__)

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(folder) finds it
BASE_FILE = "base_model.json"
UNET_PREFIX, TEXT_PREFIX = "unet.", "text_encoder."  # diffusers' prefixes in a LoRA file


class BaseModelMismatch(ConfigError):
    """Adapters trained on one base model meeting another."""


@dataclass(frozen=True)
class BaseIdentity:
    """Which base model adapters belong to: the config's `model` and a hash of the UNet's and text encoder's weights
    (what the adapters modify; the VAE is swappable, as with any SD LoRA)."""

    model: str
    sha256: str

    def describe(self) -> str:
        return f"{self.model} (weights sha256 {self.sha256[:16]})"

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, where: str) -> BaseIdentity:
        if not (isinstance(data, dict) and isinstance(data.get("model"), str) and isinstance(data.get("sha256"), str)):
            raise ValueError(f"{where}: not a base model identity (expected model and sha256): {data!r}")
        return cls(model=data["model"], sha256=data["sha256"])


def base_identity(model: str, components: SDComponents) -> BaseIdentity:
    """Hash the base weights (names, dtypes, shapes, bytes) as they are in memory; call it before adding adapters.
    About 6 s for SD 1.5's 3.9 GB of fp32 UNet + text encoder on a slow core, small against loading them."""
    digest = hashlib.sha256()
    for prefix, module in ((UNET_PREFIX, components.unet), (TEXT_PREFIX, components.text_encoder)):
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().to("cpu").contiguous()
            digest.update(f"{prefix}{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
    return BaseIdentity(model=model, sha256=digest.hexdigest())


def check_base(ours: BaseIdentity, theirs: BaseIdentity, where: str) -> None:
    """Refuse adapters (a swarm's, a checkpoint's) that were trained on another base than this peer's."""
    if ours.sha256 != theirs.sha256:
        raise BaseModelMismatch(
            f"this peer's base model {ours.describe()} differs from {where}'s {theirs.describe()}: LoRA adapters only "
            "mean something on the base they were trained on. Use the same base model files (the same hub revision "
            "or folder) as the swarm"
        )


def peft_config(lora: LoraConfig, targets: list[str]) -> peft.LoraConfig:
    # gaussian A (std 1/rank) and zero B, as kohya: the adapters start as a no-op
    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.scale_alpha, lora_dropout=lora.dropout,
                           target_modules=targets, init_lora_weights="gaussian")


def add_adapters(components: SDComponents, lora: LoraConfig, *, text_encoder: bool,
                 seed: int) -> list[torch.nn.Parameter]:
    """Freeze the base, add adapters to the UNet (and the text encoder), return the adapter parameters in a fixed
    order. The initial weights come from `seed` alone (the caller's RNG is left as it was): every peer of a swarm
    starts from the same adapters."""
    components.unet.requires_grad_(False)
    components.text_encoder.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components.unet.add_adapter(peft_config(lora, lora.target_modules))
        if text_encoder:
            components.text_encoder.add_adapter(peft_config(lora, lora.text_encoder))
    params = adapter_parameters(components)
    if not params:
        raise ValueError(f"train.lora.target_modules {lora.target_modules} matched no module of the UNet")
    for param in params:
        param.requires_grad_(True)
    return params


def adapter_parameters(components: SDComponents) -> list[torch.nn.Parameter]:
    """The adapters' tensors (UNet first, then the text encoder's), in module order: the same on every peer."""
    return [param for module in (components.unet, components.text_encoder)
            for name, param in module.named_parameters() if ".lora_" in name]


def has_adapters(module: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def adapter_state(components: SDComponents, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """diffusers' LoRA layout on the CPU: `unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`"""
    state = {}
    for prefix, module in ((UNET_PREFIX, components.unet), (TEXT_PREFIX, components.text_encoder)):
        if has_adapters(module):
            for key, value in get_peft_model_state_dict(module).items():
                state[prefix + key] = value.detach().to("cpu", dtype).contiguous()
    return state


def save_adapters(components: SDComponents, folder: Path, base: BaseIdentity, *, weight_name: str = ADAPTER_FILE,
                  with_base: bool = True, dtype: torch.dtype = torch.float32) -> Path:
    """Write the adapters (in `dtype`) with diffusers' own save_lora_weights (its layout and LoRA-config metadata, so
    alpha and rank load back as trained) into `folder`, and the base model's identity beside them."""
    folder = Path(folder)
    state = adapter_state(components, dtype)
    unet = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    text = {k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet, text_encoder_lora_layers=text or None, weight_name=weight_name,
        unet_lora_adapter_metadata=components.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=components.text_encoder.peft_config["default"].to_dict() if text else None,
    )
    if with_base:
        write_atomic(folder / BASE_FILE, (json.dumps(base.to_json(), indent=1) + "\n").encode("utf-8"))
    return folder / weight_name


def write_adapter_file(components: SDComponents, out_path: Path, base: BaseIdentity) -> Path:
    """The adapters as one diffusers LoRA file at `out_path`, written beside it and renamed into place."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with (tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as folder,
          atomic_path(out_path, durable=True) as tmp):
        written = save_adapters(components, Path(folder), base, weight_name=out_path.name, with_base=False)
        os.rename(written, tmp)  # save_lora_weights writes into a folder: its one file becomes ours
    return out_path


def load_adapters(components: SDComponents, folder: Path) -> None:
    """Load a checkpoint's adapter weights into the adapters already added (same rank and targets, or an error)."""
    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no LoRA adapters ({ADAPTER_FILE} is missing): not a LoRA checkpoint")
    state = load_file(path)
    expected = adapter_state(components)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"{path} does not fit this run's adapters (train.lora and train_text_encoder must be the ones "
                         f"it was trained with): {len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected "
                         f"(e.g. {extra[:2]})")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, this run's adapter "
                             f"{tuple(expected[key].shape)} (a different train.lora.rank?)")
    for prefix, module in ((UNET_PREFIX, components.unet), (TEXT_PREFIX, components.text_encoder)):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            with torch.no_grad():
                set_peft_model_state_dict(module, part)


def read_base(folder: Path) -> BaseIdentity:
    path = Path(folder) / BASE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the base model's identity ({exc})") from None
    return BaseIdentity.from_json(data, str(path))


def merge_adapters(components: SDComponents) -> None:
    """Fold the adapters into the base weights (W += alpha / rank * B A) and remove them: a plain model again."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    for module in (components.unet, components.text_encoder):
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
        recurse_remove_peft_layers(module)
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            if hasattr(module, attribute):
                delattr(module, attribute)


# --- kohya's layout (A1111, ComfyUI) ------------------------------------------------------------------------------

KOHYA_UNET, KOHYA_TEXT = "lora_unet_", "lora_te_"  # lora_te_: SD 1.x's one text encoder (lora_te1_ is SDXL's first)


def to_kohya(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers' LoRA layout -> kohya's: `lora_unet_<module_path>.lora_down.weight` (A), `.lora_up.weight` (B),
    `.alpha`; the text encoder as `lora_te_text_model_<...>`, the names A1111 and ComfyUI map for SD 1.x."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(UNET_PREFIX):
            module, prefix = key[len(UNET_PREFIX):], KOHYA_UNET
        elif key.startswith(TEXT_PREFIX):
            module, prefix = key[len(TEXT_PREFIX):], KOHYA_TEXT
            if not module.startswith("text_model."):  # transformers >= 5.6 dropped the wrapper kohya's names keep
                module = "text_model." + module
        else:
            raise KeyError(f"LoRA key {key!r} belongs to neither the UNet nor the text encoder")
        module, _, kind = module.rpartition(".lora_")
        name = prefix + module.replace(".", "_")
        if kind == "A.weight":
            out[f"{name}.lora_down.weight"] = value
        elif kind == "B.weight":
            out[f"{name}.lora_up.weight"] = value
        else:
            raise KeyError(f"LoRA key {key!r}: expected lora_A.weight or lora_B.weight")
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def size_of(params: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(parameters, bytes in fp32)."""
    count = sum(p.numel() for p in params)
    return count, 4 * count
