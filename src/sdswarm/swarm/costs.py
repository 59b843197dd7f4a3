"""What the swarm's network traffic will cost a peer, said before it costs it: bytes per swarm step, the state a
late joiner downloads, and the timeouts that follow from them.

Sizes come from the codecs themselves (each one's bytes for a tensor of n values, measured once on a small
tensor) and from how hivemind moves tensors: an averaging round splits the flattened tensors into parts of
`DEFAULT_PART_SIZE_BYTES` (compressed) and each peer sends its parts to the others and the averaged parts it
reduced back to them: 2 (n - 1) / n of the compressed vector for a group of n peers. A state download sends
every tensor whole, once.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.compression import CompressionBase, CompressionInfo, TensorRole

from sdswarm.config import SwarmConfig

log = logging.getLogger(__name__)

MB = 1e6


def wire_bytes(codec: CompressionBase, numel: int, role: TensorRole = TensorRole.UNSPECIFIED) -> int:
    """Bytes `codec` sends for one tensor of `numel` values: measured for small ones, else a line through two
    measured sizes."""
    if numel <= 4096:
        return _measure(codec, role, numel)
    slope, intercept = _line(codec, role)
    return int(round(slope * numel + intercept))


def _measure(codec: CompressionBase, role: TensorRole, numel: int) -> int:
    tensor = torch.randn(numel)
    with warnings.catch_warnings():  # torch's deprecation of the quantize_per_tensor that hivemind uses
        warnings.simplefilter("ignore")
        return len(codec.compress(tensor, CompressionInfo.from_tensor(tensor, role=role)).buffer)


@cache
def _line(codec: CompressionBase, role: TensorRole) -> tuple[float, float]:
    small, large = _measure(codec, role, 2048), _measure(codec, role, 4096)
    slope = (large - small) / 2048
    return slope, small - slope * 2048


def round_bytes(codec: CompressionBase, numels: Sequence[int]) -> int:
    """One compressed copy of the flattened tensors as an averaging round cuts them into parts."""
    total = 0
    for numel in numels:
        ratio = codec.estimate_compression_ratio(CompressionInfo.from_tensor(torch.empty(0), role=TensorRole.GRADIENT))
        part = max(1, int(DEFAULT_PART_SIZE_BYTES / (4 * ratio)))
        whole, rest = divmod(numel, part)
        total += whole * wire_bytes(codec, part) + (wire_bytes(codec, rest) if rest else 0)
    return total


def link_seconds(num_bytes: float, mbit: float) -> float:
    return num_bytes * 8 / (mbit * 1e6)


@dataclass(frozen=True)
class NetworkCosts:
    num_params: int
    sync: str
    codec: str
    round_bytes: int  # one compressed copy of what a round averages (gradients or pseudo-gradients)
    state_round_bytes: int  # every_step: the parameters, averaged every swarm.average_state_every swarm steps
    average_state_every: int
    download_bytes: int  # what a late joiner downloads

    @classmethod
    def of(cls, params: Sequence[torch.Tensor], swarm: SwarmConfig, codec: str, compression: CompressionBase,
           state_compression: CompressionBase) -> NetworkCosts:
        numels = [p.numel() for p in params]
        weights = sum(wire_bytes(state_compression, n, TensorRole.PARAMETER) for n in numels)
        # every_step downloads AdamW's two moments (+ a step count each); local_steps the outer momentum only
        moments = 2 if swarm.sync == "every_step" else 1
        statistics = moments * sum(wire_bytes(state_compression, n, TensorRole.OPTIMIZER) for n in numels)
        return cls(
            num_params=sum(numels), sync=swarm.sync, codec=codec,
            round_bytes=round_bytes(compression, numels),
            state_round_bytes=round_bytes(compression, numels) if swarm.sync == "every_step" else 0,
            average_state_every=swarm.average_state_every, download_bytes=weights + statistics,
        )

    def step_bytes(self, peers: int) -> float:
        """Bytes one peer sends per swarm step in a group of `peers` (as many again arrive)."""
        share = 2 * (peers - 1) / peers
        return share * (self.round_bytes + self.state_round_bytes / self.average_state_every)

    def load_state_timeout(self, swarm: SwarmConfig) -> float:
        """A download gets the configured time, or 1.5x what its bytes take at swarm.min_link_mbit if longer: a slow
        link is slow, not endless (hivemind restarts a download that overruns its timeout, from the start)."""
        return max(swarm.load_state_timeout, 1.5 * link_seconds(self.download_bytes, swarm.min_link_mbit))

    def log(self, swarm: SwarmConfig) -> None:
        peers = max(2, swarm.min_peers)
        step, large = self.step_bytes(peers), self.step_bytes(10**6)
        log.info(
            "network: swarm.sync %s, %s, %d trainable parameters: a swarm step sends about %.1f MB from each peer "
            "with %d peers (%.1f MB in a large swarm), %s at swarm.uplink_mbit %g; a late joiner downloads "
            "%.1f MB (%.2f bytes per parameter), %s at swarm.min_link_mbit %g",
            self.sync, self.codec, self.num_params, step / MB, peers, large / MB,
            _duration(link_seconds(large, swarm.uplink_mbit)), swarm.uplink_mbit, self.download_bytes / MB,
            self.download_bytes / self.num_params, _duration(link_seconds(self.download_bytes, swarm.min_link_mbit)),
            swarm.min_link_mbit,
        )
        # the larger round (gradients or pseudo-gradients) must fit its timeout even in a large swarm
        seconds = link_seconds(2 * self.round_bytes, swarm.uplink_mbit)
        if seconds > swarm.allreduce_timeout:
            log.warning(
                "network: one averaging round sends up to %.1f MB from this peer, %s at swarm.uplink_mbit %g: longer "
                "than swarm.allreduce_timeout (%.0f s). Rounds will fail and peers train on alone. Use swarm.sync: "
                "local_steps (far fewer bytes), a faster link, or raise swarm.allreduce_timeout and "
                "swarm.averaging_timeout", 2 * self.round_bytes / MB, _duration(seconds), swarm.uplink_mbit,
                swarm.allreduce_timeout,
            )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

