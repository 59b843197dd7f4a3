"""A CPU-only peer's memory: device and host memory are one, so hivemind's host copies are avoided or paged.

hivemind runs its averagers as forked processes. A forked child keeps every private page of the trainer that
existed at the fork until it exits, so a page the trainer later writes (copy on write) or frees stays resident
twice: what the trainer keeps writing must be in shared memory (or a shared file mapping) before the fork."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch


@torch.no_grad()
def share_before_fork(params: Iterable[torch.nn.Parameter]) -> None:
    """The weights and a zero `.grad` for each in shared memory (unshared, SD 1.5's optimizer state was resident
    twice at its first swarm step: measured)."""
    for param in params:
        param.share_memory_()
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        param.grad.share_memory_()


def mapped_copy(folder: Path, tensor: torch.Tensor, shape: torch.Size | None = None) -> torch.Tensor:
    """A float32 copy of `tensor` (broadcast to `shape`) in a shared file mapping in `folder`: the kernel may write
    its pages to disk and drop them under memory pressure (shared with hivemind's forked averagers like shared
    memory). The file is unlinked at once: the mapping keeps it until the process ends."""
    shape = tensor.shape if shape is None else shape
    fd, path = tempfile.mkstemp(dir=folder, prefix=".diloco-", suffix=".f32")
    os.close(fd)
    try:
        mapped = torch.from_file(path, shared=True, size=max(shape.numel(), 1), dtype=torch.float32)
    finally:
        os.unlink(path)
    mapped = mapped[: shape.numel()].view(shape)
    with torch.no_grad():
        mapped.copy_(tensor.detach().expand(shape))
    return mapped
