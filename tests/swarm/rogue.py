"""A rogue peer for the trust tests, run as its own process: `python -m tests.swarm.rogue RELAY ATTACK`.

It reads the relay's public I.E answer (the swarm's config and DHT addresses), as anyone who learns the address
can, and joins the swarm's DHT with a plain hivemind.Optimizer over tensors of the swarm's shapes:
- `epoch`: weights filled with 1234.0, reporting swarm step 1000 with one sample and offering its state to
  downloaders (the hijack measured in the trust issue: the mother downloaded it and trained on NaN);
- `poison`: trains along with gradients that are NaN (odd swarm steps) or 1e6 times a random direction (even
  ones), so its parts of every gradient round, and the averages it reduces for the others, are poisoned.
It prints its peer id first (`rogue peer id: ...`) and runs until killed.
"""

from __future__ import annotations

import argparse
import time

import hivemind
import torch

from sdswarm.model.loading import load_components
from sdswarm.swarm.exchange import fetch_join_info
from sdswarm.swarm.optimizer import COMPRESSIONS, compression_name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("relay")
    parser.add_argument("attack", choices=["epoch", "poison"])
    args = parser.parse_args()

    info = fetch_join_info(args.relay)
    config = info.config
    components = load_components(config.model)
    shapes = [p.shape for p in components.unet.parameters()]
    if config.train_text_encoder:
        shapes += [p.shape for p in components.text_encoder.parameters()]
    dht = hivemind.DHT(initial_peers=info.peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    print(f"rogue peer id: {dht.peer_id}", flush=True)
    swarm = config.swarm
    if args.attack == "epoch":
        params = [torch.nn.Parameter(torch.full(shape, 1234.0)) for shape in shapes]
        optimizer = hivemind.Optimizer(
            dht=dht, run_id=swarm.run_id, params=params, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            batch_size_per_step=1, target_batch_size=swarm.target_batch_size, matchmaking_time=swarm.matchmaking_time,
            averaging_timeout=swarm.averaging_timeout, verbose=True,
        )
        optimizer.state_averager.local_epoch = 1000
        optimizer.state_averager.state_sharing_priority = 1000
        while True:  # one sample toward swarm step 1000, again and again (hivemind's records expire)
            optimizer.tracker.report_local_progress(1000, samples_accumulated=1)
            time.sleep(5)
    params = [torch.nn.Parameter(p.detach().clone()) for p in components.unet.parameters()]
    if config.train_text_encoder:
        params += [torch.nn.Parameter(p.detach().clone()) for p in components.text_encoder.parameters()]
    codec = COMPRESSIONS[compression_name(swarm)]()
    optimizer = hivemind.Optimizer(
        dht=dht, run_id=swarm.run_id, params=params, optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        batch_size_per_step=config.train.batch_size, target_batch_size=swarm.target_batch_size,
        matchmaking_time=swarm.matchmaking_time, averaging_timeout=swarm.averaging_timeout,
        allreduce_timeout=swarm.allreduce_timeout, grad_compression=codec, state_averaging_compression=codec,
        average_state_every=swarm.average_state_every, verbose=True,
    )
    while True:
        for param in params:
            param.grad = (torch.full_like(param, float("nan")) if optimizer.local_epoch % 2
                          else 1e6 * torch.randn_like(param))
        optimizer.step()
        time.sleep(0.5)


if __name__ == "__main__":
    main()
