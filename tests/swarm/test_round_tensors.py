"""A round sends the tensors smaller than a part packed into one, and averages them as hivemind would one by one."""

from __future__ import annotations

import threading

import hivemind
import pytest
import torch
from hivemind.compression import (
    CompressionInfo,
    Float16Compression,
    ScaledFloat16Compression,
    TensorRole,
    Uniform8BitQuantization,
)

from sdswarm.swarm.round_tensors import RoundTensors
from sdswarm.swarm.validation import CheckedDecentralizedAverager


def model_like(seed: int) -> list[torch.Tensor]:
    """Biases and norms beside two large weights, of two dtypes, as a model's trainable tensors are."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(64,), (300, 40), (8, 3, 3, 3), (5,), (1,), (40, 300), (7,)]
    tensors = [torch.randn(shape, generator=generator) for shape in shapes]
    return tensors + [torch.randn(12, generator=generator, dtype=torch.float64)]


def test_the_tensors_under_a_part_travel_as_one_and_the_rest_as_they_are():
    tensors = model_like(0)
    roles = [TensorRole.PARAMETER] * len(tensors)
    roles[6] = TensorRole.OPTIMIZER  # an AdamW moment: never scaled together with weights
    infos = [CompressionInfo.from_tensor(t, key=i, role=role)
             for i, (t, role) in enumerate(zip(tensors, roles, strict=True))]
    sent = RoundTensors(tensors, infos, part_size_bytes=4000, compression=ScaledFloat16Compression())
    # the two 12,000-value weights and the lone moment and float64 tensor as they are, then the float32 weights
    # under 1000 values joined into one
    assert [t.numel() for t in sent.sent] == [12_000, 12_000, 7, 12, 64 + 216 + 5 + 1]
    assert sent.sent[0] is tensors[1] and sent.sent[2] is tensors[6] and sent.sent[3] is tensors[7]
    assert len(sent.infos) == len(sent.sent) and sent.infos[-1].role == TensorRole.PARAMETER
    assert sent.infos[-1].descriptor.size == (286,)
    torch.testing.assert_close(sent.sent[-1][64:280], tensors[2].reshape(-1))


@pytest.mark.parametrize("codec", [Uniform8BitQuantization()])
def test_a_codec_that_quantizes_a_part_on_one_scale_keeps_every_tensor_apart(codec):
    tensors = model_like(0)
    sent = RoundTensors(tensors, None, part_size_bytes=4000, compression=codec)
    assert sent.sent == tensors


def test_an_update_reaches_each_packed_tensor_and_keeps_what_changed_it_during_the_round():
    tensors = model_like(0)
    sent = RoundTensors(tensors, None, part_size_bytes=4000, compression=Float16Compression())
    before = [t.clone() for t in tensors]
    tensors[0] += 1.0  # trained on while the round ran: hivemind adds the round's update to it, and so do we
    for index, tensor in enumerate(sent.sent):
        sent.add_(index, torch.full_like(tensor, 0.5), alpha=2.0)
    for i, (tensor, old) in enumerate(zip(tensors, before, strict=True)):
        torch.testing.assert_close(tensor, old + 1.0 + (1.0 if i == 0 else 0.0))


def test_three_peers_average_a_model_of_small_tensors_as_its_mean():
    root = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [root] + [hivemind.DHT(initial_peers=root.get_visible_maddrs(), start=True,
                                  host_maddrs=["/ip4/127.0.0.1/tcp/0"]) for _ in range(2)]
    tensors = [model_like(seed) for seed in range(3)]
    expected = [sum(column) / 3 for column in zip(*tensors, strict=True)]
    # parts of 4 KB: the two weights go in 12 parts each, the small tensors packed in one
    averagers = [CheckedDecentralizedAverager(own, dht=dht, prefix="packed", target_group_size=3, min_group_size=3,
                                              min_matchmaking_time=2.0, request_timeout=1.0, part_size_bytes=2**12,
                                              compression=ScaledFloat16Compression(), start=True)
                 for own, dht in zip(tensors, dhts, strict=True)]
    try:
        groups = [None] * 3
        for _ in range(3):  # a busy machine may leave a peer out of the group: try again
            def step(i: int) -> None:
                groups[i] = averagers[i].step(timeout=30)
            threads = [threading.Thread(target=step, args=(i,)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if all(group is not None and len(group) == 3 for group in groups):
                break
        assert all(group is not None and len(group) == 3 for group in groups), groups
        for averager in averagers:
            with averager.get_tensors() as averaged:
                for tensor, mean in zip(averaged, expected, strict=True):
                    torch.testing.assert_close(tensor, mean.to(tensor.dtype), atol=2e-3, rtol=2e-3)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
