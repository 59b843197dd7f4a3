"""Swarm health: rounds recorded as data, weight fingerprints and drift, what `sdswarm status` prints."""

from __future__ import annotations

import json
import logging

import hivemind
import pytest
import torch

from sdswarm.cli import status_lines
from sdswarm.config import SwarmConfig
from sdswarm.swarm.health import FingerprintEntry, RoundLog, SwarmHealth, WeightFingerprint, round_bytes, spread
from sdswarm.swarm.network import stop_dht
from sdswarm.swarm.optimizer import make_optimizer, withdraw_progress
from sdswarm.swarm.validation import Refusal


def test_a_round_is_one_log_line_and_one_metrics_record(tmp_path, caplog):
    rounds = RoundLog(tmp_path / "metrics.jsonl", values=1_000_000, bytes_per_value=2.0)
    with caplog.at_level(logging.INFO):
        rounds.record("gradients", swarm_step=7, group_size=2, swarm_peers=3, outcome="partial", duration=1.25)
    assert "averaging gradients, swarm step 7: partial, 2 of 3 peers, 1.2 s, 2.00 MB each way" in caplog.text
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["round"] == {"kind": "gradients", "swarm_step": 7, "group_size": 2, "swarm_peers": 3,
                               "outcome": "partial", "bytes_sent": 2_000_000, "bytes_received": 2_000_000,
                               "duration": 1.25, "refused": {}}
    assert rounds.counts["gradients partial"] == 1 and rounds.snapshot()[0]["outcome"] == "partial"
    # a round where another peer's parts were refused (swarm/validation.py) names it, in the log and the record
    rounds.record("gradients", swarm_step=8, group_size=3, swarm_peers=3, outcome="complete", duration=1.0,
                  refusals=[Refusal("QmRogue", "sender", 5, 2, "5 refused: non-finite values; 2 clipped: norm")])
    assert "7 parts refused or clipped from peer QmRogue" in caplog.text
    assert rounds.snapshot()[-1]["refused"] == {"QmRogue": 7} and rounds.refused["QmRogue"] == 7


def test_round_bytes_follow_the_butterfly_all_reduce():
    assert round_bytes(1000, 4, 1) == 0  # alone: nothing on the wire
    assert round_bytes(1000, 4, 2) == 4000  # half out, half back: the whole tensor each way
    assert round_bytes(1000, 2, 4) == 3000


def test_equal_weights_give_equal_fingerprints_and_a_change_shows():
    torch.manual_seed(0)
    params = [torch.randn(300, 40), torch.randn(7), torch.randn(64, 64)]
    same = [p.clone() for p in params]
    first, second = WeightFingerprint(params, seed=42), WeightFingerprint(same, seed=42)
    assert first() == second() and len(first()) == 4
    params[0].add_(0.01 * torch.randn(300, 40))
    assert first() != second()


def entries(step: int, values: list[float], movement: float = 1.0) -> list[FingerprintEntry]:
    return [FingerprintEntry(swarm_step=step, values=values, movement=movement)]


def test_spread_is_zero_for_one_model_and_names_the_peer_that_drifted():
    one = {peer: entries(5, [1.0, 2.0, 3.0, 4.0]) for peer in ("a", "b", "c")}
    step, widest, distances = spread(one)
    assert (step, widest) == (5, 0.0) and set(distances.values()) == {0.0}
    drifted = {**one, "c": entries(5, [1.0, 2.0, 3.0, 9.0])}  # five steps' worth away from the others
    step, widest, distances = spread(drifted)
    assert widest == pytest.approx(5.0) and distances["c"] == pytest.approx(5.0) and distances["a"] == 0.0
    assert spread({"a": entries(5, [1.0] * 4), "b": entries(6, [1.0] * 4)}) is None  # no step in common


def test_status_is_bounded_marks_departed_peers_and_prints_no_escapes():
    peer = {"peer_id": "QmPeer1", "role": "relay", "address": "1.2.3.4:80", "step": 10, "local_epoch": 3,
            "loss": 0.5, "samples_per_second": 4.0, "grad_norm": 0.75, "state": "training",
            "rounds": [{"kind": "gradients", "outcome": "complete", "group_size": 2},
                       {"kind": "parameters", "outcome": "failed", "group_size": 1}]}
    gone = {**peer, "peer_id": "QmPeer2", "gone": True, "address": "\x1b[2J\x1b]0;owned\x07evil:1"}
    text = "\n".join(status_lines({"run_id": "r", "epoch": 3, "samples_toward_target": 56, "target_batch_size": 16,
                                   "samples_per_second": 4.0, "spread": 0.01, "spread_step": 3,
                                   "peers": [peer, gone]}))
    assert "16/16 samples toward the target (100%)" in text and "1 peers (1 gone)" in text
    assert "spread 0.01 swarm steps' worth at step 3" in text
    assert "gone" in text.splitlines()[-1] and "\x1b" not in text and "\x07" not in text
    assert "g2 p!" in text


def test_status_names_the_peers_whose_parts_were_refused():
    rounds = [{"kind": "gradients", "outcome": "complete", "group_size": 3, "refused": {"QmRogue": 12}},
              {"kind": "gradients", "outcome": "complete", "group_size": 3, "refused": {"QmRogue": 4}}]
    peer = {"peer_id": "QmPeer1", "role": "relay", "step": 10, "local_epoch": 3, "samples_per_second": 4.0,
            "rounds": rounds}
    text = "\n".join(status_lines({"run_id": "r", "epoch": 3, "samples_toward_target": 0, "target_batch_size": 16,
                                   "samples_per_second": 4.0, "peers": [peer, {**peer, "peer_id": "QmPeer2"}]}))
    assert "g3x g3x" in text
    assert text.splitlines()[-1].endswith("by sender: QmRogue 32")


@pytest.fixture
def lone_optimizer():
    dht = hivemind.DHT(start=True)
    params = [torch.nn.Parameter(torch.randn(8, 8))]
    optimizer = make_optimizer(dht=dht, params=params, batch_size_per_step=4, lr=0.1, betas=(0.9, 0.999), eps=1e-8,
                               weight_decay=0.0, max_grad_norm=1.0, verbose=True,
                               swarm=SwarmConfig(target_batch_size=4, matchmaking_time=1, averaging_timeout=5,
                                                 compression="none"))
    yield optimizer, params
    optimizer.shutdown()
    stop_dht(dht)


def test_a_lone_peer_records_its_rounds_gradient_norm_and_fingerprint(lone_optimizer, tmp_path):
    optimizer, params = lone_optimizer
    rounds = RoundLog(tmp_path / "metrics.jsonl", values=64, bytes_per_value=4.0)
    health = SwarmHealth(optimizer, rounds, WeightFingerprint(params, seed=1)).attach()
    try:
        for _ in range(3):  # each step reaches the target: a swarm step
            (params[0] ** 2).sum().mul(10).backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        health.detach()
    assert optimizer.local_epoch == 3
    outcomes = [(r["kind"], r["outcome"], r["group_size"]) for r in health.published()["rounds"]]
    assert outcomes == [("gradients", "alone", 1)] * 3
    assert health.grad_norm is not None and health.grad_norm > 1.0  # before clipping to max_grad_norm 1.0
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["swarm_step"] for s in steps if "swarm_step" in s] == [1, 2, 3]
    assert all(len(s["fingerprint"]) == 4 for s in steps if "swarm_step" in s)


def test_a_stopped_peer_withdraws_its_samples_and_throughput(lone_optimizer):
    optimizer, params = lone_optimizer
    optimizer.tracker.target_batch_size = 1000  # no swarm step: the samples stay accumulated
    for _ in range(3):
        params[0].sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.tracker.local_progress.samples_accumulated == 12
    withdraw_progress(optimizer)
    progress = optimizer.tracker.local_progress
    assert progress.samples_accumulated == 0 and progress.samples_per_second < 1e-6
    assert optimizer.grad_averager.local_samples_accumulated == 0
