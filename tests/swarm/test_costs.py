"""What each codec loses on small gradients, and the network estimate against what hivemind really sends."""

from __future__ import annotations

import warnings

import pytest
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import CompressionInfo, deserialize_torch_tensor

from sdswarm.config import SwarmConfig
from sdswarm.model.loading import TINY_MODEL_ID, load_components
from sdswarm.swarm.costs import NetworkCosts, link_seconds
from sdswarm.swarm.optimizer import COMPRESSIONS, compression_name, state_compression

CODECS = ["none", "fp16", "scaled_fp16", "uniform8bit"]  # blockwise8bit needs bitsandbytes (CUDA)


def codec_error(name: str, spread: float) -> tuple[float, float]:
    """(relative RMS error, share of values sent as zero) for Gaussian gradients of this spread, cut into the 1-D
    parts that hivemind's all-reduce compresses."""
    values = torch.randn(2**20, generator=torch.Generator().manual_seed(0)) * spread
    codec = COMPRESSIONS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = torch.cat([deserialize_torch_tensor(codec.compress(part, CompressionInfo.from_tensor(part)))
                              for part in values.split(2**17)])
    error = ((restored - values).norm() / values.norm()).item()
    return error, (restored == 0).float().mean().item()


@pytest.mark.parametrize("spread", [1e-6, 1e-7])
def test_scaled_fp16_and_8bit_keep_small_gradients_that_a_plain_fp16_cast_loses(spread):
    errors = {name: codec_error(name, spread) for name in CODECS}
    print(f"spread {spread:g}: " + ", ".join(f"{n} {e:.2%} error, {z:.1%} zeroed" for n, (e, z) in errors.items()))
    assert errors["none"] == (0.0, 0.0)
    assert errors["scaled_fp16"][0] < 1e-3 and errors["scaled_fp16"][1] == 0
    assert errors["uniform8bit"][0] < 0.02  # scale-free: the same at every spread
    assert errors["fp16"][0] > 0.01 and errors["fp16"][1] > 0.02  # 1.7 % / 17 %: values under 6e-8 flush to zero


def test_each_mode_defaults_to_the_codec_that_keeps_its_signal():
    assert compression_name(SwarmConfig()) == "scaled_fp16"
    assert compression_name(SwarmConfig(sync="local_steps")) == "uniform8bit"
    assert compression_name(SwarmConfig(sync="local_steps", compression="fp16")) == "fp16"


@pytest.mark.parametrize("sync", ["every_step", "local_steps"])
def test_the_network_estimate_is_what_an_averaging_round_serializes(sync):
    params = [p for p in load_components(TINY_MODEL_ID).unet.parameters()]
    swarm = SwarmConfig(sync=sync)
    name = compression_name(swarm)
    codec = COMPRESSIONS[name]()
    costs = NetworkCosts.of(params, swarm, name, codec, state_compression())
    # two peers: each sends the other the half it does not reduce, and gets it back averaged
    container = TensorPartContainer([p.detach() for p in params], peer_fractions=(1.0, 1.0), compression=codec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = sum(len(codec.compress(part, info).buffer) for part, info in container._input_parts_by_peer[1])
    rounds = 2 if sync == "every_step" else 1  # every_step also averages the parameters each swarm step
    assert costs.step_bytes(2) == pytest.approx(2 * rounds * half, rel=0.05)
    per_param = costs.download_bytes / costs.num_params
    # was 12 (fp32 weights and moments); small tensors go whole, so the tiny model pays a little more than SD
    assert per_param < (4.5 if sync == "every_step" else 3.5), per_param


def test_a_download_gets_the_time_its_bytes_need_at_the_slowest_link():
    swarm = SwarmConfig(min_link_mbit=10, load_state_timeout=600)
    big = NetworkCosts(num_params=860_000_000, sync="every_step", codec="scaled_fp16", round_bytes=0,
                       state_round_bytes=0, average_state_every=1, download_bytes=3_440_000_000)
    assert big.load_state_timeout(swarm) == pytest.approx(1.5 * link_seconds(3.44e9, 10))  # ~69 min, not 10
    small = NetworkCosts(num_params=1000, sync="every_step", codec="scaled_fp16", round_bytes=0,
                         state_round_bytes=0, average_state_every=1, download_bytes=4000)
    assert small.load_state_timeout(swarm) == 600
