"""How long one averaging round takes: hivemind's averager against sdswarm's (not a test; prints figures).
sdswarm's joins the tensors smaller than a part into one (swarm/round_tensors.py); hivemind sends each tensor in
parts of its own.

    .venv/bin/python bench/round_time.py [--peers 3] [--rounds 4]   # the tiny model's tensors
    .venv/bin/python bench/round_time.py --lora-rank 8              # a LoRA swarm of SD 1.5 (its adapters' shapes)

One process: each peer is a DHT and an averager (their own processes, as in a node) on 127.0.0.1, all in one group,
holding tensors of the tiny model's trainable shapes (UNet + text encoder), or of SD 1.5's LoRA adapters at a rank
(configs/sd_1-5-lora.yaml's targets), averaged with scaled fp16 as gradients are. Also the same values as one flat
tensor, the floor. Compare the ratios of one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import ScaledFloat16Compression
from lora_sizes import sd15_adapters  # bench/ is this script's folder

from sdswarm.model.loading import TINY_MODEL_ID, load_components
from sdswarm.swarm.validation import CheckedDecentralizedAverager


def round_seconds(averager_class: type, shapes: list[torch.Size], peers: int, rounds: int, prefix: str) -> list[float]:
    """Each round's time, from the peers' common start to the last peer's average."""
    dhts = [hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    dhts += [hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dhts[0].get_visible_maddrs())
             for _ in range(peers - 1)]
    generator = torch.Generator().manual_seed(0)
    averagers = [averager_class([torch.randn(shape, generator=generator) for shape in shapes], dht=dht, prefix=prefix,
                                start=True, target_group_size=peers, min_group_size=peers, min_matchmaking_time=2.0,
                                request_timeout=1.0, compression=ScaledFloat16Compression())
                 for dht in dhts]
    times = []
    try:
        for _ in range(rounds + 1):  # the first round also warms up: not counted
            began = time.monotonic()
            threads = [threading.Thread(target=averager.step, kwargs=dict(timeout=120)) for averager in averagers]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            times.append(time.monotonic() - began)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, help="SD 1.5's LoRA adapters of this rank instead of the tiny model")
    args = parser.parse_args()
    if args.lora_rank is None:
        name, components = "tiny model", load_components(TINY_MODEL_ID)
        shapes = [p.shape for p in (*components.unet.parameters(), *components.text_encoder.parameters())]
    else:
        name, shapes = f"SD 1.5 LoRA rank {args.lora_rank}", [p.shape for p in sd15_adapters(args.lora_rank)]
    values = sum(shape.numel() for shape in shapes)
    print(f"{name}: {len(shapes)} tensors, {values:,} values; {args.peers} peers, {args.rounds} rounds each")
    rows = [("hivemind's averager", DecentralizedAverager, shapes),
            ("sdswarm's averager", CheckedDecentralizedAverager, shapes),
            ("one flat tensor", DecentralizedAverager, [torch.Size([values])])]
    medians = {}
    for name, averager_class, tensor_shapes in rows:
        times = round_seconds(averager_class, tensor_shapes, args.peers, args.rounds, prefix=f"bench{len(medians)}")
        medians[name] = statistics.median(times)
        print(f"{name:20s} median {medians[name]:5.2f} s  ({', '.join(f'{t:.2f}' for t in times)})")
    print(f"sdswarm's round takes {medians[rows[1][0]] / medians[rows[0][0]]:.2f}x hivemind's")


if __name__ == "__main__":
    main()
