"""DiLoCo in one process: two peers on real DHTs take outer steps that match a hand computation; a late joiner
downloads the global weights and the outer momentum, compressed, and holds the swarm's weights afterwards."""

from __future__ import annotations

import json
import threading
import time

import hivemind
import pytest
import torch
from hivemind.compression import NoCompression, TensorRole

from sdswarm.config import SwarmConfig
from sdswarm.swarm.costs import NetworkCosts
from sdswarm.swarm.diloco import DiLoCoOptimizer
from sdswarm.swarm.health import RoundLog, SwarmHealth, WeightFingerprint, round_bytes
from sdswarm.swarm.optimizer import state_compression

H, LR, MOMENTUM, INNER_LR = 3, 0.7, 0.9, 0.1
SHAPES = [(64, 48), (64,), (3000,)]


def start_dht(initial_peers=()) -> hivemind.DHT:
    return hivemind.DHT(start=True, initial_peers=list(initial_peers), host_maddrs=["/ip4/127.0.0.1/tcp/0"])


def make_peer(dht: hivemind.DHT, run_id: str) -> tuple[list[torch.nn.Parameter], DiLoCoOptimizer]:
    torch.manual_seed(0)  # every peer starts from the same weights
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    optimizer = DiLoCoOptimizer(
        dht=dht, run_id=run_id, params=params, inner_optimizer=lambda p: torch.optim.SGD(p, lr=INNER_LR),
        local_steps=H, batch_size_per_step=1, outer_lr=LR, outer_momentum=MOMENTUM, compression=NoCompression(),
        state_compression=state_compression(), matchmaking_time=2.0, averaging_timeout=30.0, allreduce_timeout=30.0,
        load_state_timeout=30.0, verbose=False,
    )
    return params, optimizer


def local_phase(params, optimizer: DiLoCoOptimizer, grads: list[list[torch.Tensor]], deadline: float | None) -> None:
    """Local steps with the given gradients, then zero-sample steps until the swarm step has happened (if a
    deadline is given)."""
    epoch = optimizer.local_epoch
    for step_grads in grads:
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
    while deadline is not None and optimizer.local_epoch == epoch:
        assert time.monotonic() < deadline, "no swarm step"
        for param in params:
            param.grad = torch.zeros_like(param)
        optimizer.step(batch_size=0)
        time.sleep(0.2)


def see_each_other(optimizers: list[DiLoCoOptimizer], timeout: float = 60) -> None:
    """The start-up barrier's second half (node.py): a peer that has not yet seen the others steps alone."""
    deadline = time.monotonic() + timeout
    while min(opt.tracker.global_progress.num_peers for opt in optimizers) < len(optimizers):
        assert time.monotonic() < deadline, "the peers did not see each other"
        time.sleep(0.2)


def test_two_peers_take_the_nesterov_step_on_the_mean_pseudo_gradient_and_a_joiner_downloads_it(tmp_path):
    dht_a = start_dht()
    dht_b = start_dht(dht_a.get_visible_maddrs())
    run_id = f"diloco{time.time_ns()}"
    (params_a, opt_a), (params_b, opt_b) = make_peer(dht_a, run_id), make_peer(dht_b, run_id)
    optimizers = [opt_a, opt_b]
    # each outer step is an averaging round on record (metrics.jsonl), with a fingerprint of the global weights
    values = sum(p.numel() for p in params_a)
    for name, params, opt in (("a", params_a, opt_a), ("b", params_b, opt_b)):
        SwarmHealth(opt, RoundLog(tmp_path / f"{name}.jsonl", values=values, bytes_per_value=4.0),
                    WeightFingerprint(params, seed=0)).attach()
    joiner = None
    try:
        globals_ = [p.detach().clone() for p in params_a]
        momentum = [torch.zeros_like(p) for p in globals_]
        generator = torch.Generator().manual_seed(1)
        for outer in range(2):
            grads = {name: [[torch.randn(s, generator=generator) for s in SHAPES] for _ in range(H)] for name in "ab"}
            first = 0
            if outer == 0:  # hivemind's tracker announces a peer once it has trained a sample: one step each first
                for name, params, opt in (("a", params_a, opt_a), ("b", params_b, opt_b)):
                    local_phase(params, opt, grads[name][:1], deadline=None)
                see_each_other(optimizers)
                first = 1
            deadline = time.monotonic() + 60
            threads = [threading.Thread(target=local_phase, args=(params, opt, grads[name][first:], deadline))
                       for name, params, opt in (("a", params_a, opt_a), ("b", params_b, opt_b))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=90)
            assert [opt.local_epoch for opt in optimizers] == [outer + 1] * 2
            for opt in optimizers:
                assert (opt.last_outer_step.outcome, opt.last_outer_step.group_size) == ("averaged", 2)

            # by hand: each peer's local weights after H plain SGD steps; Nesterov on the mean pseudo-gradient
            pseudo = []
            for i, g in enumerate(globals_):
                local = {name: g - INNER_LR * sum(step[i] for step in grads[name]) for name in "ab"}
                pseudo.append(g - (local["a"] + local["b"]) / 2)
            for i in range(len(globals_)):
                momentum[i] = MOMENTUM * momentum[i] + pseudo[i]
                globals_[i] = globals_[i] - LR * (pseudo[i] + MOMENTUM * momentum[i])
            for params in (params_a, params_b):  # every peer restarts from the same global weights
                for param, expected in zip(params, globals_, strict=True):
                    torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-5)
            for opt in optimizers:
                buffers = [opt.state_averager.optimizer.state[g]["momentum_buffer"] for g in opt.global_params]
                for buffer, expected in zip(buffers, momentum, strict=True):
                    torch.testing.assert_close(buffer, expected, rtol=1e-5, atol=1e-5)

        records = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
                   for name in "ab"}
        for name in "ab":
            rounds = [(r["kind"], r["swarm_step"], r["outcome"], r["group_size"], r["bytes_sent"])
                      for r in (record["round"] for record in records[name] if "round" in record)]
            assert rounds == [("outer", step, "complete", 2, round_bytes(values, 4.0, 2)) for step in (0, 1)]
        fingerprints = [[v for r in records[name] if "fingerprint" in r for v in r["fingerprint"]] for name in "ab"]
        assert len(fingerprints[0]) == 2 * 4 and fingerprints[0] == pytest.approx(fingerprints[1], abs=1e-4)

        # a late joiner with other weights downloads the global weights and the outer momentum
        dht_c = start_dht(dht_a.get_visible_maddrs())
        torch.manual_seed(5)
        params_c = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
        joiner = DiLoCoOptimizer(
            dht=dht_c, run_id=run_id, params=params_c, inner_optimizer=lambda p: torch.optim.SGD(p, lr=INNER_LR),
            local_steps=H, batch_size_per_step=1, outer_lr=LR, outer_momentum=MOMENTUM, compression=NoCompression(),
            state_compression=state_compression(), matchmaking_time=2.0, averaging_timeout=30.0,
            allreduce_timeout=30.0, load_state_timeout=30.0, verbose=False,
        )
        joiner.tracker.fetched_global_progress_this_epoch.wait(timeout=30)
        assert joiner.load_state_from_peers()
        assert joiner.local_epoch == 2
        for param, expected in zip(params_c, globals_, strict=True):  # fp16: half a unit in the last place
            torch.testing.assert_close(param.detach(), expected, rtol=2**-11, atol=1e-6)
        buffers = [joiner.state_averager.optimizer.state[g]["momentum_buffer"] for g in joiner.global_params]
        for buffer, expected in zip(buffers, momentum, strict=True):  # 8-bit: ~1.6 % (tests/swarm/test_costs.py)
            assert (buffer - expected).norm() <= 0.03 * expected.norm()

        # what it downloaded: the global weights in fp16 and the outer momentum in 8 bits, nothing else
        metadata, tensors, infos = opt_a.state_averager.get_current_state()
        assert len(tensors) == 2 * len(SHAPES)
        sent = sum(len(state_compression().compress(t, info).buffer) for t, info in zip(tensors, infos, strict=True))
        num_params = sum(p.numel() for p in params_a)
        roles = [info.role for info in infos]
        assert roles == [TensorRole.PARAMETER] * 3 + [TensorRole.OPTIMIZER] * 3
        assert sent / num_params < 4, f"{sent / num_params:.2f} bytes per parameter"
        swarm = SwarmConfig(sync="local_steps")
        estimate = NetworkCosts.of(params_a, swarm, "none", NoCompression(), state_compression()).download_bytes
        assert estimate == pytest.approx(sent, rel=0.01)
    finally:
        for opt in [*optimizers, joiner]:
            if opt is not None:
                opt.shutdown()
