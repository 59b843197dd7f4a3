"""What a peer takes from others, checked: the parts a reducer averages, the swarm steps a tracker hears, the states
a peer downloads. One process, no peers (the attacks with real processes are in test_swarm.py)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import hivemind
import pytest
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import CompressionInfo, TensorRole
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration, get_dht_time

from sdswarm.swarm.catch_up import (
    MAX_STATE_CHANGE,
    UNMEASURED_REFRESH_PERIOD,
    DownloadProgress,
    PackedTensors,
    TrustedProgressTracker,
    state_problem,
)
from sdswarm.swarm.optimizer import state_compression
from sdswarm.swarm.validation import (
    CLIP_RATIO,
    CheckedAveraging,
    CheckedPartReducer,
    Quarantine,
    QuarantineBoard,
    robust_mean,
)


def honest_parts(n: int, size: int = 1000) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    common = torch.randn(size, generator=generator)
    return [common + torch.randn(size, generator=generator) for _ in range(n)]


def test_honest_parts_are_averaged_as_hivemind_does():
    parts, weights = honest_parts(3), [4.0, 8.0, 4.0]
    mean, actions = robust_mean(parts, weights, own=0)
    expected = sum(p * w for p, w in zip(parts, weights, strict=True)) / sum(weights)
    torch.testing.assert_close(mean, expected)
    assert actions == [None, None, None]


@pytest.mark.parametrize("own", [0, None])
def test_a_nan_or_1e6x_part_is_refused_as_flagrant_and_a_10x_one_clipped(own):
    honest = honest_parts(2)
    for poison, action, flagrant in ((torch.full((1000,), float("nan")), "refused: non-finite values", True),
                                     (1e6 * torch.randn(1000), "refused: norm", True),
                                     (10 * honest[0], "clipped: norm", False)):
        mean, actions = robust_mean([*honest, poison], [1.0, 1.0, 1.0], own=own)
        assert actions[:2] == [None, None] and str(actions[2]).startswith(action), actions
        assert actions[2].flagrant == flagrant, actions  # its sender is quarantined (test_quarantine_*)
        assert torch.isfinite(mean).all()
        # the poisoned part pulls the mean at most CLIP_RATIO x the honest scale / 3 away from the honest mean
        honest_mean = (honest[0] + honest[1]) / 2
        assert (mean - honest_mean).norm() <= CLIP_RATIO * max(p.norm() for p in honest) * 2 / 3 + 1e-3


def test_in_outer_rounds_a_huge_part_is_clipped_not_flagrant():
    """A DiLoCo peer that just downloaded the state sends a pseudo-gradient near zero: next to it, an honest one is
    orders of magnitude larger, and must not get its sender quarantined."""
    near_zero, honest = 1e-7 * honest_parts(1)[0], honest_parts(1)[0]
    _, actions = robust_mean([near_zero, honest], [1.0, 1.0], own=0, kind="outer")
    assert str(actions[1]).startswith("clipped: norm") and not actions[1].flagrant, actions


def test_two_peers_a_liar_cannot_make_the_reducer_clip_its_own_part():
    mine = honest_parts(1)[0]
    for lie in (torch.zeros(1000), 1e-9 * mine, 1e6 * mine):  # too small (a tiny median) or far too large
        mean, actions = robust_mean([mine, lie], [1.0, 1.0], own=0)
        assert actions[0] is None
        assert mean.norm() <= (1 + CLIP_RATIO) / 2 * mine.norm() + 1e-3


def test_in_parameter_rounds_weights_far_from_this_peers_are_refused():
    mine = honest_parts(1)[0]
    other = mine + 0.01 * torch.randn(1000)
    for rogue in (torch.full((1000,), 1234.0), mine + 3 * mine.norm() / 1000 ** 0.5 * torch.randn(1000)):
        mean, actions = robust_mean([mine, other, rogue], [1.0, 1.0, 1.0], own=0, kind="parameters")
        assert actions[:2] == [None, None] and str(actions[2]).startswith("refused: weights"), actions
        assert not actions[2].flagrant  # honest peers drift apart: not grounds for a quarantine
        torch.testing.assert_close(mean, (mine + other) / 2)


def test_weights_are_capped_and_bad_weights_refused():
    parts = honest_parts(3)
    mean, actions = robust_mean(parts, [1.0, 1.0, 1e9], own=0)
    assert str(actions[2]).startswith("clipped: weight") and (mean - parts[2]).norm() > 0.1 * parts[2].norm()
    _, actions = robust_mean(parts, [1.0, float("nan"), -1.0], own=0)
    assert str(actions[1]).startswith("refused: weight") and str(actions[2]).startswith("refused: weight")


def test_the_reducer_averages_each_part_once_every_sender_sent_it():
    async def reduce() -> tuple[list[torch.Tensor], CheckedPartReducer]:
        shapes = [torch.Size([1000]), torch.Size([1000])]
        reducer = CheckedPartReducer(shapes, 3, own_sender=0)
        parts = [honest_parts(2) + [torch.full((1000,), float("nan"))], honest_parts(2) + [1e6 * torch.ones(1000)]]
        results = await asyncio.gather(*(reducer.accumulate_part(sender, index, parts[index][sender])
                                         for index in range(2) for sender in (2, 1, 0)))
        return results, reducer

    results, reducer = asyncio.run(reduce())
    assert all(torch.isfinite(r).all() for r in results)
    torch.testing.assert_close(results[0], (honest_parts(2)[0] + honest_parts(2)[1]) / 2)  # NaN refused
    assert not reducer.actions[1] and not reducer.actions[0]
    assert sorted(str(action).split(" ")[1] for action in reducer.actions[2]) == ["non-finite", "norm"]
    assert all(action.refused and action.flagrant for action in reducer.actions[2])


def test_a_quarantine_ends_and_doubles_on_each_repeat():
    quarantine = Quarantine(period=1.0)
    quarantine.add("QmRogue", "gradients round: 1 refused: non-finite values")
    assert quarantine.holds("QmRogue") and not quarantine.holds("QmHonest")
    time.sleep(1.2)
    assert not quarantine.holds("QmRogue")
    quarantine.add("QmRogue", "again")
    time.sleep(1.2)
    assert quarantine.holds("QmRogue")  # 2 s the second time
    time.sleep(1.0)
    assert not quarantine.holds("QmRogue")



def test_a_peer_one_averager_quarantines_is_kept_out_by_the_peers_other_averagers():
    """Each averager runs in its own process: the gradient averager catches a NaN sender, and the parameter
    averager (where the share it reduces would stay unaveraged) keeps it out too, for as long."""
    board = QuarantineBoard(seats=2)
    gradients, parameters = board.quarantine(period=60.0), board.quarantine(period=60.0)
    with pytest.raises(RuntimeError, match="none left"):
        board.quarantine()
    catcher = mp.get_context("fork").Process(target=gradients.add, args=("QmRogue", "1 refused: non-finite values"))
    catcher.start()
    catcher.join(timeout=30)
    assert catcher.exitcode == 0
    deadline = time.monotonic() + 10
    while not parameters.holds("QmRogue") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert parameters.holds("QmRogue") and not parameters.holds("QmHonest")
    assert 50 < parameters.until["QmRogue"] - time.monotonic() <= 60


class CheckedRounds(CheckedAveraging, DecentralizedAverager):
    refusal_kind = "gradients"


def test_a_peer_caught_sending_1e6x_parts_is_kept_out_of_the_next_rounds():
    """Refusing a poisoner's parts is not enough: the share it reduces stays unaveraged, and the honest peers drift
    apart on it. Once caught, it is quarantined: the honest peers average without it."""
    root = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [hivemind.DHT(initial_peers=root.get_visible_maddrs(), start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            for _ in range(2)]
    options = dict(prefix="quarantine", target_group_size=3, min_group_size=2, min_matchmaking_time=2.0,
                   request_timeout=1.0, allreduce_timeout=10.0,
                   part_size_bytes=2**12, start=True)  # many parts: every peer reduces a share
    honest = [CheckedRounds([torch.full((100_000,), float(i))], dht=dht, **options) for i, dht in enumerate(dhts, 1)]
    # plain hivemind: its parts, and the averages it reduces with them, are ~1e6x the honest ones
    rogue = DecentralizedAverager([torch.full((100_000,), 1e6)], dht=root, **options)
    try:
        def round_(weights: tuple[float, float] = (1.0, 1.0)) -> list:
            began = time.monotonic()
            steps = [a.step(weight=weight, wait=False, timeout=timeout, allow_retries=True)
                     for a, weight, timeout in ((honest[0], weights[0], 30), (honest[1], weights[1], 30),
                                                (rogue, 1.0, 8))]
            results = []
            for step in steps:
                try:
                    results.append(step.result(timeout=60))
                except Exception:  # noqa: BLE001 (a failed round, e.g. the rogue alone)
                    results.append(None)
            time.sleep(1.0)  # the refusals come through a queue from the averagers' processes
            print(f"round: {time.monotonic() - began:.1f} s, groups {[r and len(r) for r in results]}")
            return results

        refusals: list[list] = [[], []]
        for _ in range(5):  # until the rogue was in a group with each of them (matchmaking may leave it out once)
            round_()
            for seen, averager in zip(refusals, honest, strict=True):
                seen += averager.take_reports()[0]
            if all(refusals):
                break
        assert all(refusals) and all(r.sender == str(rogue.peer_id) and r.flagrant for rs in refusals for r in rs), \
            refusals
        # the next round is the honest peers' alone; one of them tags along with weight 0 and zeros, as hivemind
        # does after catching up: the other's part, however far from its zeros, is what it takes, refusing nothing
        with honest[0].get_tensors() as (tensor,):
            expected = tensor.clone()
        with honest[1].get_tensors() as (tensor,):
            tensor.zero_()
        for _ in range(3):  # a round that found no group (a busy machine) changed nothing: try again
            results = round_(weights=(1.0, 0.0))
            if all(r is not None for r in results[:2]):
                break
        assert all(r is not None and set(r) == {a.peer_id for a in honest} for r in results[:2]), results
        assert not any(a.take_reports()[0] for a in honest)
        for averager in honest:
            with averager.get_tensors() as (tensor,):
                torch.testing.assert_close(tensor, expected)
    finally:
        for averager in [*honest, rogue]:
            averager.shutdown()
        for dht in [*dhts, root]:
            dht.shutdown()


def test_a_state_is_checked_before_it_replaces_this_peers():
    params = [torch.randn(10, 10), torch.randn(10)]
    stats = [torch.rand(10, 10)]
    good = [p + 0.01 * torch.randn_like(p) for p in params] + [s.clone() for s in stats]

    def problem(tensors, epoch=5, local_epoch=3, ceiling=6):
        return state_problem({"epoch": epoch}, tensors, params=params, others=stats, local_epoch=local_epoch,
                             ceiling=ceiling)

    assert problem(good) is None
    assert "beyond the swarm's 5" in problem(good, epoch=1000)
    assert "behind this peer's 3" in problem(good, epoch=2)
    assert "non-finite" in problem([good[0], good[1], torch.full((10, 10), float("nan"))])
    assert "shape (5,)" in problem([good[0], torch.zeros(5), good[2]])
    assert "3 tensors" not in (problem(good[:2]) or "") and "2 tensors" in problem(good[:2])
    rogue = [torch.full_like(p, 1234.0) for p in params] + stats  # the hijack's weights
    assert f"at most {MAX_STATE_CHANGE}" in problem(rogue)


def test_a_downloaded_state_is_held_compressed_and_decompressed_tensor_by_tensor():
    """As the state comes over the wire (fp16 weights, 8-bit moments): half its fp32 size or less, each tensor
    restored when read, within its codec's error; the checks and hivemind's load read it through slices."""
    weights, moments = torch.randn(256, 64), torch.rand(64, 64)
    codec = state_compression()
    messages = [codec.compress(weights, CompressionInfo.from_tensor(weights, key=0, role=TensorRole.PARAMETER)),
                codec.compress(moments, CompressionInfo.from_tensor(moments, key=1, role=TensorRole.OPTIMIZER))]
    packed = PackedTensors([m.SerializeToString() for m in messages])
    assert len(packed) == 2 and packed.num_bytes < 0.5 * 4 * (weights.numel() + moments.numel())
    torch.testing.assert_close(packed[0], weights, atol=2e-3, rtol=1e-3)  # fp16
    assert (packed[1] - moments).abs().max() < 0.02 and packed[1:][0].shape == moments.shape  # 8-bit
    assert state_problem({"epoch": 1}, packed, params=[weights], others=[moments], local_epoch=0, ceiling=2) is None


def test_a_state_download_says_how_much_of_it_came_and_how_fast(caplog, monkeypatch):
    clock = iter([100.0, 130.0, 140.0, 160.0, 200.0, 200.0])  # readings: start, each add, each describe()
    monkeypatch.setattr("sdswarm.swarm.catch_up.time.monotonic", lambda: next(clock))
    donor = PeerID.from_base58("QmWHYTcg27gVwMuwLWBeGbUtC4D9hyiz4hAtQ2YjBmzWnC")
    progress = DownloadProgress(donor, expected=20_000_000, every=30.0)
    with caplog.at_level("INFO", logger="sdswarm.swarm.catch_up"):
        progress.add(7_500_000)  # at 30 s: a line
        progress.add(2_500_000)  # at 40 s: none, 30 s have not passed since the last
    assert [r.getMessage() for r in caplog.records] == [
        f"downloading the state from peer {donor}: 7.5 MB of about 20.0 MB (38%) in 30 s, 2.0 Mbit/s"]
    assert progress.describe() == "10.0 MB of about 20.0 MB (50%) in 60 s, 1.3 Mbit/s"
    assert DownloadProgress(donor, expected=None).describe().startswith("0.0 MB in ")


@pytest.fixture(scope="module")
def dht():
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield dht
    dht.shutdown()


def record(epoch: int, samples: int = 1, rate: float = 1.0, name: bytes = b"peer") -> ValueWithExpiration:
    progress = LocalTrainingProgress(peer_id=name, epoch=epoch, samples_accumulated=samples, samples_per_second=rate,
                                     time=get_dht_time(), client_mode=False)
    return ValueWithExpiration(progress.dict(), get_dht_time() + 60)


def test_the_tracker_hears_the_next_swarm_step_but_not_a_jump_to_1000(dht):
    tracker = TrustedProgressTracker(dht=dht, prefix="trust-a", target_batch_size=32, start=False)
    assert tracker.trusted_epoch == 0  # alone at start: its own step
    view = {b"honest": record(1, name=b"honest"), b"rogue": record(1000, name=b"rogue")}
    assert set(tracker.plausible(view)) == {b"honest"}
    progress = tracker._parse_swarm_progress_data(view)
    assert progress.epoch == 1 and progress.num_peers == 1
    assert set(tracker.plausible({b"honest": record(2, name=b"honest")})) == {b"honest"}  # one more step
    tracker.distrust(PeerID(b"honest"))  # a donor whose state was refused: its progress is not heard again
    assert tracker.plausible({b"honest": record(2, name=b"honest")}) == {}


def test_samples_trained_while_the_tracker_reads_the_dht_still_count_toward_the_target(dht):
    """The read returns this peer's record as it was when the read began (seconds earlier on a busy machine)."""
    tracker = TrustedProgressTracker(dht=dht, prefix="trust-own", target_batch_size=32, start=False)
    tracker.report_local_progress(0, 16)  # trained during the read
    stale = LocalTrainingProgress(peer_id=dht.peer_id.to_bytes(), epoch=0, samples_accumulated=0,
                                  samples_per_second=1.0, time=get_dht_time() - 2, client_mode=False)
    view = {tracker._local_public_key: ValueWithExpiration(stale.dict(), get_dht_time() + 60),
            b"other": record(0, samples=8, name=b"other")}
    progress = tracker._parse_swarm_progress_data(view)
    assert progress.samples_accumulated == 16 + 8 and progress.num_peers == 2


def test_a_tracker_that_has_not_measured_its_speed_looks_again_soon(dht):
    """At start and after the start-up barrier: an estimate built on no speed says the target is minutes away."""
    tracker = TrustedProgressTracker(dht=dht, prefix="trust-speed", target_batch_size=1000, start=False)
    view = {b"other": record(0, samples=4, rate=0.2, name=b"other")}
    assert tracker._parse_swarm_progress_data(view).next_fetch_time <= get_dht_time() + UNMEASURED_REFRESH_PERIOD
    tracker.performance_ema.update(4, interval=0.1)  # its first batch, at 40 samples/s: the target is 25 s away
    assert tracker._parse_swarm_progress_data(view).next_fetch_time > get_dht_time() + UNMEASURED_REFRESH_PERIOD


def test_a_joiner_adopts_the_swarms_step_unless_only_a_minority_claims_it(dht):
    swarm = {f"peer{i}".encode(): record(50, name=f"peer{i}".encode()) for i in range(2)}
    tracker = TrustedProgressTracker(dht=dht, prefix="trust-b", target_batch_size=32, start=False)
    tracker.trusted_epoch = None  # as on a joiner's first view of a swarm under way
    assert set(tracker.plausible({**swarm, b"rogue": record(1000, name=b"rogue")})) == set(swarm)
    assert tracker.trusted_epoch == 50
