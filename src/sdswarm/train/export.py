"""Export a checkpoint as one `.safetensors` file in the original Stable Diffusion (CompVis/ldm) layout.

A1111 and ComfyUI load such a file directly: the UNet under `model.diffusion_model.*`, the VAE under
`first_stage_model.*`, the CLIP text encoder under `cond_stage_model.transformer.*`. The key mapping is the
one of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, derived from the model's own
config instead of SD 1.x's fixed shape (4 blocks, 2 layers each), so smaller models convert too. Every
tensor is mapped exactly once, or the export fails: a silently missing key would be a broken model.

SD 1.x family only (CLIP ViT-L-style text encoder): SD 2.x keeps its OpenCLIP text encoder under other
names, which this module does not write.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdswarm.atomic import atomic_path
from sdswarm.model.ema import EMA
from sdswarm.model.loading import SDComponents, load_components
from sdswarm.train.checkpoint import STATE_FILE, load_training_state

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _split_module(rest: str, names: dict[str, str]) -> str:
    """Rename the leading module of `rest` (e.g. "norm1.weight") by `names`."""
    for diffusers_name, ldm_name in names.items():
        if rest.startswith(diffusers_name + "."):
            return ldm_name + rest[len(diffusers_name):]
    raise KeyError(rest)


def unet_key(key: str, config) -> str:
    """A diffusers UNet2DConditionModel key -> its name in the original SD UNet (without the prefix)."""
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError(f"UNet with per-block layers_per_block {layers!r} has no original SD layout")
    for diffusers_name, ldm_name in _UNET_TOP.items():
        if key.startswith(diffusers_name + "."):
            return ldm_name + key[len(diffusers_name):]
    if match := _BLOCK.match(key):
        kind, block, part, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        if kind == "down_blocks":
            position = (layers + 1) * block + index + 1
            if part == "resnets":
                return f"input_blocks.{position}.0.{_split_module(rest, _UNET_RESNET)}"
            if part == "attentions":
                return f"input_blocks.{position}.1.{rest}"
            if part == "downsamplers" and rest.startswith("conv."):
                return f"input_blocks.{(layers + 1) * (block + 1)}.0.op.{rest[len('conv.'):]}"
        else:
            position = (layers + 1) * block + index
            if part == "resnets":
                return f"output_blocks.{position}.0.{_split_module(rest, _UNET_RESNET)}"
            if part == "attentions":
                return f"output_blocks.{position}.1.{rest}"
            if part == "upsamplers":
                # the upsampler follows the block's last layer: after its attention if it has one
                slot = 2 if "CrossAttn" in config.up_block_types[block] else 1
                return f"output_blocks.{(layers + 1) * block + layers}.{slot}.{rest}"
    if match := _MID.match(key):
        part, index, rest = match[1], int(match[2]), match[3]
        if part == "resnets":
            return f"middle_block.{2 * index}.{_split_module(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    raise KeyError(f"UNet key {key!r} has no place in the original SD layout")


def vae_key(key: str, config) -> str:
    """A diffusers AutoencoderKL key -> its name in the original SD VAE (without the prefix)."""
    blocks = len(config.block_out_channels)
    coder, _, rest = key.partition(".")
    if coder in ("quant_conv", "post_quant_conv"):
        return key
    if coder not in ("encoder", "decoder"):
        raise KeyError(f"VAE key {key!r} has no place in the original SD layout")
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    if rest.startswith("conv_norm_out."):
        return f"{coder}.norm_out.{rest[len('conv_norm_out.'):]}"
    if match := re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", rest):
        kind, block, part, index, tail = match[1], int(match[2]), match[3], int(match[4]), match[5]
        tail = tail.replace("conv_shortcut.", "nin_shortcut.")
        if kind == "down_blocks":
            name = f"down.{block}.block.{index}" if part == "resnets" else f"down.{block}.downsample"
        else:  # the original numbers the decoder's blocks from the bottom
            up = blocks - 1 - block
            name = f"up.{up}.block.{index}" if part == "resnets" else f"up.{up}.upsample"
        return f"{coder}.{name}.{tail}"
    if match := re.match(r"^mid_block\.resnets\.(\d+)\.(.+)$", rest):
        return f"{coder}.mid.block_{int(match[1]) + 1}.{match[2].replace('conv_shortcut.', 'nin_shortcut.')}"
    if rest.startswith("mid_block.attentions.0."):
        return f"{coder}.mid.attn_1.{_split_module(rest[len('mid_block.attentions.0.'):], _VAE_ATTENTION)}"
    raise KeyError(f"VAE key {key!r} has no place in the original SD layout")


def original_state_dict(components: SDComponents) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoder under their original SD 1.x names (tensors shared, not copied)."""
    text_config = components.text_encoder.config
    if text_config.hidden_act != "quick_gelu":
        raise ValueError(
            f"the text encoder ({text_config.hidden_act} activation, hidden size {text_config.hidden_size}) is not "
            "SD 1.x's CLIP ViT-L; the single-file export writes the SD 1.x layout only: use the diffusers folder"
        )
    out: dict[str, torch.Tensor] = {}

    def put(key: str, value: torch.Tensor) -> None:
        if key in out:
            raise ValueError(f"two tensors map to {key!r}")
        out[key] = value

    unet, vae = components.unet, components.vae
    for key, value in unet.state_dict().items():
        put(UNET_PREFIX + unet_key(key, unet.config), value)
    for key, value in vae.state_dict().items():
        name = vae_key(key, vae.config)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original's attention projections are 1x1 convolutions
        put(VAE_PREFIX + name, value)
    for key, value in components.text_encoder.state_dict().items():
        # transformers >= 5.6 dropped the text_model wrapper; the original layout keeps it
        name = key if key.startswith("text_model.") else "text_model." + key
        put(TEXT_PREFIX + name, value)
    return out


def swap_in_ema(components: SDComponents, ema_state: dict) -> None:
    """Load the EMA weights of a training state into the trained modules: the UNet, and the text encoder when
    it was trained too (told apart by the number of tensors the EMA holds)."""
    unet_params = list(components.unet.parameters())
    text_params = list(components.text_encoder.parameters())
    count = len(ema_state["shadow"])
    if count == len(unet_params):
        trained = unet_params
    elif count == len(unet_params) + len(text_params):
        trained = unet_params + text_params
    else:
        raise ValueError(f"the EMA holds {count} tensors: neither the UNet's {len(unet_params)} nor UNet + text "
                         f"encoder's {len(unet_params) + len(text_params)}")
    ema = EMA(trained, decay=float(ema_state["decay"]))
    ema.load_state_dict(ema_state)  # checks every shape
    ema.copy_to(trained)


def export_single_file(checkpoint_dir: str | Path, out_path: str | Path, use_ema: bool, half: bool = False) -> Path:
    """Write one checkpoint (a diffusers folder from Checkpoints.save) as an original-layout .safetensors file.

    use_ema: write the EMA weights of the trained parts (error if the run kept none). half: store floats as
    fp16 (half the size, what most shared SD files are); default fp32, exactly the trained weights.
    """
    checkpoint_dir = Path(checkpoint_dir)
    components = load_components(str(checkpoint_dir))
    state = load_training_state(checkpoint_dir) if (checkpoint_dir / STATE_FILE).is_file() else {}
    if use_ema:
        if state.get("ema") is None:
            raise ValueError(f"{checkpoint_dir} holds no EMA weights (the run had use_ema: False, or this is not "
                             "a training checkpoint); export without EMA")
        swap_in_ema(components, state["ema"])
    metadata = {"sdswarm.checkpoint": checkpoint_dir.name, "sdswarm.ema": str(use_ema).lower()}
    if "progress" in state:
        metadata["sdswarm.step"] = str(state["progress"]["step"])
    path = save_single_file(components, out_path, half=half, metadata=metadata)
    log.info("exported %s (%s weights) to %s", checkpoint_dir, "EMA" if use_ema else "trained", path)
    return path


def save_single_file(components: SDComponents, out_path: str | Path, *, half: bool = False,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write the components as they are in memory (e.g. inside EMA.swapped_in) as an original-layout file,
    next to its final name first and renamed into place, so a reader never sees half a file."""
    out_path = Path(out_path)
    tensors = {}
    for key, value in original_state_dict(components).items():
        value = value.detach().to("cpu")
        if half and value.is_floating_point():
            value = value.half()
        tensors[key] = value.contiguous()
    prediction_type = components.noise_scheduler.config.prediction_type
    metadata = {"format": "pt", "modelspec.prediction_type": {"v_prediction": "v"}.get(prediction_type,
                                                                                       prediction_type),
                **(metadata or {})}
    with atomic_path(out_path, durable=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out_path
