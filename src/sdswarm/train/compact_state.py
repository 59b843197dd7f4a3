"""A LoRA checkpoint's training state in about a byte per adapter parameter: AdamW's moments as blockwise fp8.

AdamW's two fp32 moments are 8 bytes per parameter, twice the adapters themselves: 151 MB of SD 1.5's rank-32
checkpoint. Here each moment is stored as float8 (e4m3: every value keeps its own exponent, 3 mantissa bits) scaled
per block of `BLOCK` values so that the block's largest value sits at the top of fp8's range, with one fp32 scale
per block: 1.016 bytes per value. The second moment is stored as its square root, which halves its dynamic range
(AdamW divides by that root anyway); a value below a block's range comes back as zero, as AdamW's state begins.
Every value (the second moment: its root, hence AdamW's step size) comes back within 6.25 % of itself (half of e4m3's
step) unless it is below 1/28672 of its block's largest (fp8's smallest normal value).
The moments decay (beta1 0.9 forgets in tens of steps, beta2 0.999 in thousands), so the error fades and is never
compounded; a late joiner's download already carries them in 8 bits (swarm/optimizer.py: state_compression).
An EMA of the adapters is stored in fp16, as the adapters are (model/lora.py).

`compact` is applied when a LoRA checkpoint is written, `expand` by every reader (train/checkpoint.py): a compact
tensor is a dict {FP8_KEY: the fp8 values, "scales", "shape", "sqrt"} in place of the tensor, which torch.load's
weights_only reads.
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK = 256
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_KEY = "fp8_blocks"
LINEAR_MOMENTS = {"exp_avg", "momentum_buffer"}  # AdamW's first moment; DiLoCo's outer SGD momentum
ROOT_MOMENTS = {"exp_avg_sq"}  # AdamW's second moment: never negative, stored as its square root


def pack(tensor: torch.Tensor, *, sqrt: bool = False) -> dict[str, Any]:
    """A float tensor as blockwise-scaled fp8 (`sqrt`: its square root, for a tensor that is never negative)."""
    flat = tensor.detach().to("cpu", torch.float32).flatten()
    if sqrt:
        flat = flat.clamp_min(0).sqrt()
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
    scales = padded.abs().amax(dim=1) / FP8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block stays zero
    values = (padded / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # clamped: a rounding past 448 is NaN
    return {FP8_KEY: values.flatten()[: flat.numel()], "scales": scales, "shape": list(tensor.shape), "sqrt": sqrt}


def unpack(packed: dict[str, Any]) -> torch.Tensor:
    count = packed[FP8_KEY].numel()
    values = torch.nn.functional.pad(packed[FP8_KEY].to(torch.float32), (0, -count % BLOCK)).view(-1, BLOCK)
    flat = (values * packed["scales"][:, None]).flatten()[:count]
    return (flat.square() if packed["sqrt"] else flat).view(packed["shape"])


def compact(state: dict[str, Any]) -> dict[str, Any]:
    """The training state with its optimizer moments packed (wherever they sit: AdamW's state, DiLoCo's inner and
    outer optimizers) and the EMA's shadow in fp16; everything else as it is."""
    out = {key: value if key == "ema" else _pack_moments(value) for key, value in state.items()}
    if state.get("ema") is not None:
        out["ema"] = {**state["ema"], "shadow": [t.half() if t.is_floating_point() else t
                                                 for t in state["ema"]["shadow"]]}
    return out


def expand(value: Any) -> Any:
    """Undo `compact` anywhere in a nested state (an fp16 EMA shadow loads as it is: EMA keeps fp32 itself)."""
    if isinstance(value, dict):
        if FP8_KEY in value:
            return unpack(value)
        return {k: expand(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        expanded = [expand(v) for v in value]
        return expanded if isinstance(value, list) else tuple(expanded)
    return value


def _pack_moments(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: pack(v, sqrt=k in ROOT_MOMENTS) if _is_moment(k, v) else _pack_moments(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        packed = [_pack_moments(v) for v in value]
        return packed if isinstance(value, list) else tuple(packed)
    return value


def _is_moment(key: Any, value: Any) -> bool:
    return (key in LINEAR_MOMENTS or key in ROOT_MOMENTS) and torch.is_tensor(value) and value.is_floating_point()
