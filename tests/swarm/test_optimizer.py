from __future__ import annotations

import importlib.util

import hivemind.compression.serialization as serialization
import pytest

from sdswarm.swarm.optimizer import COMPRESSIONS, check_compression


@pytest.mark.parametrize("name", sorted(COMPRESSIONS))
def test_every_compression_the_config_offers_round_trips_here(name):
    if name == "blockwise8bit" and importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(RuntimeError, match=r"(?s)'blockwise8bit' does not work.*bitsandbytes package"):
            check_compression(name)
        return
    check_compression(name)  # hivemind 1.1.12's 8-bit decoder failed on numpy 2.4: partial rounds, silently


def test_a_codec_that_cannot_decode_stops_the_node_with_the_fix(monkeypatch):
    def broken(serialized_tensor):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"], "extract", broken)
    with pytest.raises(RuntimeError, match=r"swarm.compression 'uniform8bit' does not work.*numpy<2.4.*scaled_fp16"):
        check_compression("uniform8bit")


def _alone(run_id: str, in_place: bool, sync: str = "every_step"):
    import hivemind
    import torch

    from sdswarm.config import SwarmConfig
    from sdswarm.swarm.optimizer import make_optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(64, 48), (64,), (3000,)]]
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    swarm = SwarmConfig(run_id=run_id, sync=sync, target_batch_size=2, local_steps=2, matchmaking_time=1.0,
                        averaging_timeout=10.0, allreduce_timeout=10.0)
    optimizer = make_optimizer(dht=dht, params=params, swarm=swarm, batch_size_per_step=1, lr=0.01,
                               betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, max_grad_norm=None,
                               in_place=in_place, verbose=False)
    return dht, params, optimizer


def _storage_bytes(optimizer, params) -> int:
    """Bytes of the distinct tensors a peer's optimizer holds for its parameters (weights, gradients, copies)."""
    import torch

    tensors = [*params, *(p.grad for p in params if p.grad is not None)]
    tensors += optimizer.state_averager._averaged_tensors
    tensors += [p for group in optimizer.opt.param_groups for p in group["params"]]
    tensors += [p.grad for group in optimizer.opt.param_groups for p in group["params"] if p.grad is not None]
    tensors += [t for state in optimizer.opt.state.values() for t in state.values()
                if torch.is_tensor(t) and t.numel() > 1]
    if optimizer.grad_averager is not None:
        tensors += optimizer.grad_averager._averaged_tensors
        tensors += optimizer.grad_averager._local_accumulators or ()
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())


def test_a_cpu_peer_holds_one_copy_and_takes_the_same_swarm_steps_as_hiveminds_layout():
    """On the CPU the optimizer keeps 16 bytes per parameter (weights, one .grad, AdamW's moments) instead of
    hivemind's 28, and the weights after two swarm steps are the same as with hivemind's layout (a GPU peer's)."""
    import torch

    from sdswarm.swarm.optimizer import InPlaceOptimizer

    results = {}
    for in_place in (False, True):
        dht, params, optimizer = _alone(f"inplace-{in_place}", in_place)
        try:
            assert isinstance(optimizer, InPlaceOptimizer) == in_place
            count = sum(p.numel() for p in params)
            results[in_place, "bytes"] = _storage_bytes(optimizer, params) / count
            for swarm_step in range(2):  # the same gradient for each micro-batch of a swarm step: their mean
                gradients = [torch.full_like(p, 0.5 - swarm_step) for p in params]
                while optimizer.local_epoch == swarm_step:
                    with torch.no_grad():
                        for param, grad in zip(params, gradients, strict=True):  # as autograd accumulates
                            if param.grad is None:
                                param.grad = grad.clone()
                            else:
                                param.grad += grad
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            results[in_place, "weights"] = [p.detach().clone() for p in params]
        finally:
            optimizer.shutdown()
            dht.shutdown()
    assert results[True, "bytes"] == 16 and results[False, "bytes"] == 28
    for lean, stock in zip(results[True, "weights"], results[False, "weights"], strict=True):
        torch.testing.assert_close(lean, stock)


@pytest.mark.timeout(300)  # hivemind retries a failed download for ever: a regression would hang here
def test_a_download_slower_than_load_state_timeout_completes_and_restores_the_state_within_its_codecs(monkeypatch):
    """A donor behind a slow link (a pause before each part it sends): the download takes longer than the configured
    swarm.load_state_timeout and each part longer than hivemind's wait for one (the averager's request_timeout), and
    it completes, because its time follows its bytes at swarm.min_link_mbit. The joiner holds the donor's weights
    to fp16 and AdamW's moments to 8 bits, and its swarm step."""
    import asyncio
    import time

    import hivemind
    import torch
    from hivemind.averaging import DecentralizedAverager

    from sdswarm.config import SwarmConfig
    from sdswarm.swarm.optimizer import make_optimizer

    pause = 0.5
    serve = DecentralizedAverager.rpc_download_state

    async def slow_link(self, request, context):
        async for message in serve(self, request, context):
            await asyncio.sleep(pause)
            yield message

    monkeypatch.setattr(DecentralizedAverager, "rpc_download_state", slow_link)  # before the averagers fork
    swarm = SwarmConfig(run_id="slow-link", target_batch_size=2, matchmaking_time=1.0, averaging_timeout=10.0,
                        allreduce_timeout=10.0, load_state_timeout=2.0, min_link_mbit=0.1)

    def peer(seed: int, initial_peers=()):
        torch.manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(512, 512), (512,), (20000,)]]
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=list(initial_peers))
        optimizer = make_optimizer(dht=dht, params=params, swarm=swarm, batch_size_per_step=1, lr=0.01,
                                   betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=None, verbose=False)
        return dht, params, optimizer

    donor = joiner = None
    try:
        donor = peer(0)
        dht, params, optimizer = donor
        while optimizer.local_epoch == 0:  # one swarm step alone: AdamW's moments are no longer zero
            for param in params:
                param.grad = torch.randn_like(param) * 1e-3
            optimizer.step()
        joiner = peer(5, dht.get_visible_maddrs())
        _, joined, late = joiner
        late.tracker.fetched_global_progress_this_epoch.wait(timeout=30)
        started = time.monotonic()
        late.load_state_from_peers()
        seconds = time.monotonic() - started
        assert swarm.load_state_timeout < seconds < late.load_state_timeout, (seconds, late.load_state_timeout)
        assert late.local_epoch == optimizer.local_epoch == 1
        for mine, theirs in zip(joined, params, strict=True):
            torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=2**-11, atol=1e-6)  # fp16
        held = [[p for group in opt.opt.param_groups for p in group["params"]] for opt in (late, optimizer)]
        for mine, theirs in zip(*held, strict=True):  # AdamW's own tensors (the weights or their offloaded copy)
            for moment in ("exp_avg", "exp_avg_sq"):
                got, want = late.opt.state[mine][moment], optimizer.opt.state[theirs][moment]
                assert (got - want).norm() <= 0.03 * want.norm(), moment  # 8-bit
    finally:
        for dht, _, optimizer in (p for p in (joiner, donor) if p is not None):
            optimizer.shutdown()
            dht.shutdown()
