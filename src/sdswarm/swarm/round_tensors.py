"""Small tensors travel together: hivemind's all-reduce sends each tensor in parts of its own, so a tensor smaller
than one part still costs a message from every sender to every reducer and back. A model is mostly such tensors
(biases, norms, LoRA's adapters): on loopback a round of the tiny model's 360 tensors (1.7 M values) took 4 to 7 s,
the same values as one flat tensor 0.2 s (`bench/round_time.py`). So a round sends the tensors smaller than a part
joined into one flat tensor, and adds the update it gets back for it to each of them.

Only where a codec treats every value alike (none, fp16, scaled fp16: scaling keeps fp16's relative precision
whatever the scale). An 8-bit codec quantizes a part on one scale, which would round a small-valued tensor packed
beside a large-valued one to zero: those rounds keep hivemind's tensor-by-tensor parts. Every peer of a swarm runs
the same sdswarm version (checked at join), so every peer packs the same way."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hivemind.compression import CompressionBase, CompressionInfo, Float16Compression, NoCompression, TensorRole

PACKABLE = (NoCompression, Float16Compression)  # ScaledFloat16Compression is a Float16Compression


class RoundTensors:
    """`tensors` as a round sends them (`sent`): those of at least `part_size_bytes` as they are, then the rest
    joined into one flat tensor per dtype, device and role. `add_` applies the round's update of a sent tensor to the
    tensors it holds, as hivemind adds an update to each tensor: what changed them during the round stays."""

    def __init__(self, tensors: Sequence[torch.Tensor], infos: Sequence[CompressionInfo] | None, *,
                 part_size_bytes: int, compression: CompressionBase) -> None:
        infos = list(infos) if infos is not None else [CompressionInfo.from_tensor(t, key=i)
                                                       for i, t in enumerate(tensors)]
        # one joined tensor per dtype, device and role: weights and AdamW's moments (~1e-8) are not scaled as one
        small: dict[tuple[torch.dtype, torch.device, TensorRole], list[int]] = {}
        if isinstance(compression, PACKABLE):
            for i, tensor in enumerate(tensors):
                if tensor.numel() * tensor.element_size() < part_size_bytes:
                    small.setdefault((tensor.dtype, tensor.device, infos[i].role), []).append(i)
        groups = [members for members in small.values() if len(members) > 1]
        packed = {i for members in groups for i in members}
        kept = [i for i in range(len(tensors)) if i not in packed]
        self.sent = [tensors[i] for i in kept]
        self.infos = [infos[i] for i in kept]
        self.held = [[tensors[i]] for i in kept]  # the tensors each sent tensor stands for
        for members in groups:
            joined = torch.cat([tensors[i].detach().reshape(-1) for i in members])
            role = infos[members[0]].role
            self.sent.append(joined)
            self.infos.append(CompressionInfo.from_tensor(joined, key=f"small {joined.dtype} {role.name}", role=role))
            self.held.append([tensors[i] for i in members])

    @torch.no_grad()
    def add_(self, index: int, update: torch.Tensor, alpha: float = 1.0) -> None:
        """tensor += alpha * update for the sent tensor `index`, or for each tensor packed in it."""
        offset = 0
        for tensor in self.held[index]:
            tensor.add_(update[offset : offset + tensor.numel()].view_as(tensor), alpha=alpha)
            offset += tensor.numel()
