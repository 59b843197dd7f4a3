"""Swarm health: rounds recorded as data, weight fingerprints and drift, what `sdswarm status` prints."""

from __future__ import annotations

import json
import logging
import threading
import time
from types import SimpleNamespace

import hivemind
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.performance_ema import PerformanceEMA

from sdswarm.cli import status_lines
from sdswarm.config import SwarmConfig
from sdswarm.swarm.catch_up import UNMEASURED_REFRESH_PERIOD
from sdswarm.swarm.health import FingerprintEntry, RoundLog, SwarmHealth, WeightFingerprint, round_bytes, spread
from sdswarm.swarm.network import stop_dht
from sdswarm.swarm.optimizer import make_optimizer, withdraw_progress
from sdswarm.swarm.telemetry import wait_for_progress_from, wait_for_stragglers
from sdswarm.swarm.validation import Refusal


def test_a_round_is_one_log_line_and_one_metrics_record(tmp_path, caplog):
    rounds = RoundLog(tmp_path / "metrics.jsonl", values=1_000_000, bytes_per_value=2.0)
    with caplog.at_level(logging.INFO):
        rounds.record("gradients", swarm_step=7, group_size=2, swarm_peers=3, outcome="partial", duration=1.25)
    assert "averaging gradients, swarm step 7: partial, 2 of 3 peers, 1.2 s, 2.00 MB each way" in caplog.text
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["round"] == {"kind": "gradients", "swarm_step": 7, "group_size": 2, "swarm_peers": 3,
                               "outcome": "partial", "bytes_sent": 2_000_000, "bytes_received": 2_000_000,
                               "duration": 1.25, "refused": {}, "missing": 0.0}
    assert rounds.counts["gradients partial"] == 1 and rounds.snapshot()[0]["outcome"] == "partial"
    # a round where another peer's parts were refused (swarm/validation.py) names it, in the log and the record
    rounds.record("gradients", swarm_step=8, group_size=3, swarm_peers=3, outcome="complete", duration=1.0,
                  refusals=[Refusal("QmRogue", "sender", 5, 2, "5 refused: non-finite values; 2 clipped: norm")])
    assert "7 parts refused or clipped from peer QmRogue" in caplog.text
    assert rounds.snapshot()[-1]["refused"] == {"QmRogue": 7} and rounds.refused["QmRogue"] == 7
    # everyone gathered, but a reducer's share never came back (hivemind: "received 67% results"): partial
    rounds.record("gradients", swarm_step=9, group_size=3, swarm_peers=3, outcome="complete", duration=1.0,
                  missing=1 / 3)
    assert "swarm step 9: partial, 3 of 3 peers" in caplog.text and "33% of the values came back without" in caplog.text


class FakeOptimizer:
    """What SwarmHealth reads of a hivemind.Optimizer around a gradient round, and a state download that lands at the
    swarm's step."""

    def __init__(self, peers: int, missing: float = 0.0) -> None:
        self.local_epoch, self.loads = 4, 0
        self.tracker = SimpleNamespace(global_progress=SimpleNamespace(num_peers=peers))
        self.grad_averager = SimpleNamespace(take_reports=lambda: ([], missing))
        self.opt = SimpleNamespace(last_grad_norm=0.5)

    def load_state_from_peers(self) -> None:
        self.loads += 1


class FinishedRound:
    def __init__(self, group: int) -> None:
        self.group = group

    def done(self) -> bool:
        return True

    def exception(self) -> None:
        return None

    def result(self) -> dict:
        return dict.fromkeys(range(self.group))


@pytest.mark.parametrize(("peers", "began", "group", "missing", "policy", "loads"), [
    (3, False, 0, 0.0, True, 1),  # no group could start while two others trained: the swarm's step, downloaded
    (3, True, 3, 0.4, True, 1),  # a reducer's share never came back: this peer's step is not the group's
    (3, True, 3, 0.0, True, 0),  # a complete round: nothing to repair
    (3, True, 2, 0.0, True, 0),  # a partial group: its members agree; parameter rounds bring the groups together
    (1, False, 0, 0.0, True, 0),  # alone in the swarm: its own step is the swarm's
    (3, False, 0, 0.0, False, 0),  # swarm.after_failed_round: local (hivemind's way)
    (3, False, 0, 0.0, "last", 0),  # the swarm's last step (train.max_swarm_steps): its final round merges it
])
def test_a_failed_gradient_round_is_repaired_by_loading_the_swarms_state(tmp_path, caplog, peers, began, group,
                                                                        missing, policy, loads):
    optimizer = FakeOptimizer(peers, missing)
    rounds = RoundLog(tmp_path / "metrics.jsonl", values=64, bytes_per_value=4.0)
    health = SwarmHealth(optimizer, rounds, None, resync_after_failed_round=bool(policy),
                         last_swarm_step=optimizer.local_epoch if policy == "last" else None)
    with caplog.at_level(logging.INFO):
        if health._wrap_begin(lambda *args: began)(None):
            health._wrap_average(lambda control: None)(FinishedRound(group))
        health.after_swarm_step()
    assert optimizer.loads == loads and health.resyncs == loads
    if loads:
        assert "loading the swarm's state instead of keeping this peer's own step" in caplog.text
        (resync,) = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
                     if "resync" in r]
        assert resync["from_swarm_step"] == 4


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


def test_the_last_swarm_step_waits_for_peers_still_finishing_it():
    dht = hivemind.DHT(start=True)
    try:
        key = "run_progress"  # hivemind's progress records, as its tracker writes them
        optimizer = SimpleNamespace(tracker=SimpleNamespace(training_progress_key=key), dht=dht, local_epoch=6)

        def report(peer: bytes, epoch: int) -> None:
            progress = {"peer_id": peer, "epoch": epoch, "samples_accumulated": 0, "samples_per_second": 1.0,
                        "time": get_dht_time(), "client_mode": False}
            dht.store(key, subkey=peer, value=progress, expiration_time=get_dht_time() + 60)

        report(dht.peer_id.to_bytes(), 6)  # this peer's own record is not waited for
        straggler = PeerID.from_base58("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N").to_bytes()
        assert wait_for_stragglers(optimizer, timeout=30, stop=threading.Event()) == 0
        report(straggler, 5)
        timer = threading.Timer(2.0, report, (straggler, 6))  # it finishes its last round
        timer.start()
        began = time.monotonic()
        assert wait_for_stragglers(optimizer, timeout=30, stop=threading.Event()) == 0
        assert 1.5 < time.monotonic() - began < 20
        report(straggler, 5)  # one that never gets there: the wait is bounded, or ended by a signal
        assert wait_for_stragglers(optimizer, timeout=1, stop=threading.Event()) == 1
        stop = threading.Event()
        stop.set()
        assert wait_for_stragglers(optimizer, timeout=30, stop=stop) == 1
    finally:
        stop_dht(dht)


def test_the_start_up_barrier_waits_until_every_peer_has_trained_a_first_step():
    """A slow peer (a mother serving its relay) must not find the others' first swarm step made without it."""
    dht = hivemind.DHT(start=True)
    try:
        key = "run_progress"
        progress = SimpleNamespace(num_peers=3, next_fetch_time=1e12)
        tracker = SimpleNamespace(training_progress_key=key, global_progress=progress,
                                  global_state_updated=threading.Event(), performance_ema=PerformanceEMA())
        tracker.performance_ema.update(4, interval=20.0)  # its first batch, timed across the first half's wait
        optimizer = SimpleNamespace(tracker=tracker, dht=dht, local_epoch=0)
        slow = PeerID.from_base58("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N").to_bytes()

        def report(peer: bytes, samples: int) -> None:
            record = {"peer_id": peer, "epoch": 0, "samples_accumulated": samples, "samples_per_second": 1.0,
                      "time": get_dht_time(), "client_mode": False}
            dht.store(key, subkey=peer, value=record, expiration_time=get_dht_time() + 60)

        report(dht.peer_id.to_bytes(), 4)
        report(slow, 0)  # up, counted by hivemind's tracker, but still in its first step
        assert wait_for_progress_from(optimizer, count=2, timeout=1.5) == 1  # bounded: trains anyway
        # its tracker looks again within UNMEASURED_REFRESH_PERIOD, and measures this peer's speed from the next batch
        # on, not 0.2 samples/s from a batch timed across the wait
        assert progress.next_fetch_time <= get_dht_time() + UNMEASURED_REFRESH_PERIOD
        assert tracker.global_state_updated.is_set() and tracker.performance_ema.num_updates == 0
        tracker.performance_ema.update(4, interval=0.1)
        assert tracker.performance_ema.samples_per_second == pytest.approx(40)
        threading.Timer(1.0, report, (slow, 4)).start()
        began = time.monotonic()
        assert wait_for_progress_from(optimizer, count=2, timeout=30) == 2
        assert 0.5 < time.monotonic() - began < 20
    finally:
        stop_dht(dht)
