"""Exponential moving average of model parameters, kept off the training device by default."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


class EMA:
    """shadow <- d_t * shadow + (1 - d_t) * param, with d_t = min(decay, (1 + t) / (10 + t)) under warm-up
    (t = 1, 2, ... counts update() calls) or d_t = decay without it.

    Floating-point shadows are kept in float32: with decay 0.9999 the per-step change is far below fp16/bf16
    resolution and would be rounded away."""

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        decay: float = 0.9999,
        warmup: bool = True,
        device: str | torch.device = "cpu",
    ):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.device = torch.device(device)
        self.num_updates = 0
        self.shadow = [self._to_shadow(p) for p in parameters]

    def _to_shadow(self, p: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if p.is_floating_point() else p.dtype
        return p.detach().to(device=self.device, dtype=dtype, copy=True)

    def decay_at(self, t: int) -> float:
        """Decay used by the t-th update (t >= 1)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + t) / (10 + t))

    def _check(self, params: list[torch.Tensor]) -> None:
        if len(params) != len(self.shadow):
            raise ValueError(f"expected {len(self.shadow)} parameters, got {len(params)}")
        for i, (s, p) in enumerate(zip(self.shadow, params, strict=True)):
            if s.shape != p.shape:
                raise ValueError(f"parameter {i}: shape {tuple(p.shape)} != EMA shape {tuple(s.shape)}")

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        params = list(parameters)
        self._check(params)
        self.num_updates += 1
        d = self.decay_at(self.num_updates)
        for s, p in zip(self.shadow, params, strict=True):
            if s.is_floating_point():
                s.lerp_(p.detach().to(device=s.device, dtype=s.dtype), 1.0 - d)
            else:  # integer tensors cannot be averaged; track the latest value
                s.copy_(p.detach())

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        params = list(parameters)
        self._check(params)
        for s, p in zip(self.shadow, params, strict=True):
            p.copy_(s.to(device=p.device, dtype=p.dtype))

    @contextmanager
    def swapped_in(self, parameters: Iterable[torch.nn.Parameter]) -> Iterator[None]:
        """Temporarily load the EMA weights into `parameters` (for sampling/export); the originals are
        restored on exit, also after an exception. The backup lives on CPU so accelerator memory is not
        doubled."""
        params = list(parameters)
        self._check(params)
        with torch.no_grad():
            backup = [p.detach().to("cpu", copy=True) for p in params]
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b.to(p.device))

    def state_dict(self) -> dict:
        return {
            "shadow": list(self.shadow),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        self._check(shadow)
        self.shadow = [self._to_shadow(t) for t in shadow]
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", self.warmup))
