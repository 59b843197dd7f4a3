import numpy as np
import pytest

from sdswarm.data.shards import (
    Permutation,
    ShardPlan,
    assign_slots,
    choose_slot,
    preferred_slot,
    slot_preferences,
)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097, 65536])
def test_permutation_is_a_bijection_with_an_inverse(n: int) -> None:
    perm = Permutation(n, "test", 7)
    places = np.arange(n)
    positions = perm(places)
    assert sorted(positions.tolist()) == list(range(n))
    assert perm.inverse(positions).tolist() == places.tolist()


def test_permutation_depends_on_its_key_only() -> None:
    a, b, c = Permutation(1000, 1, 0), Permutation(1000, 1, 0), Permutation(1000, 1, 1)
    assert a(np.arange(1000)).tolist() == b(np.arange(1000)).tolist()
    assert a(np.arange(1000)).tolist() != c(np.arange(1000)).tolist()
    assert a(np.arange(1000)).tolist() != list(range(1000))


@pytest.mark.parametrize(
    ("size", "per_chunk", "shards", "peers"),
    [
        (10_000, 100, 8, 8),  # many rounds per epoch
        (10_000, 100, 8, 5),  # fewer peers than slots
        (1_013, 50, 4, 4),  # chunks do not divide the index evenly
        (240, 1000, 4, 3),  # the demo: fewer posts than shards * chunk, chunks shrink
        (37, 10, 64, 10),  # fewer posts than shards: some chunks are empty, never shared
    ],
)
def test_peers_never_overlap_and_together_cover_the_index(size, per_chunk, shards, peers) -> None:
    plan = ShardPlan(seed=42, size=size, images_per_chunk=per_chunk, shards=shards)
    slots = assign_slots(42, [f"peer-{i}" for i in range(peers)], shards)
    assert len(set(slots.values())) == peers  # distinct slots
    rounds = 3 * plan.rounds_per_epoch
    for epoch in range(3):
        seen_this_epoch: set[int] = set()
        for r in range(epoch * plan.rounds_per_epoch, (epoch + 1) * plan.rounds_per_epoch):
            in_round: set[int] = set()
            for slot in slots.values():
                chunk = plan.chunk(r, slot).tolist()
                assert len(chunk) <= per_chunk and len(set(chunk)) == len(chunk)
                assert in_round.isdisjoint(chunk), f"two peers share a post in round {r}"
                assert seen_this_epoch.isdisjoint(chunk), f"a post drawn twice in epoch {epoch}"
                in_round.update(chunk)
                seen_this_epoch.update(chunk)
        # all slots, not only the peers present, cover the index exactly once per epoch
        everything = [p for r in range(epoch * plan.rounds_per_epoch, (epoch + 1) * plan.rounds_per_epoch)
                      for s in range(shards) for p in plan.chunk(r, s).tolist()]
        assert sorted(everything) == list(range(size))
    assert r == rounds - 1


def test_epochs_reshuffle_and_chunks_are_reproducible() -> None:
    plan = ShardPlan(seed=1, size=500, images_per_chunk=50, shards=2)
    again = ShardPlan(seed=1, size=500, images_per_chunk=50, shards=2)
    assert plan.rounds_per_epoch == 5
    assert plan.chunk(0, 1).tolist() == again.chunk(0, 1).tolist()
    assert plan.chunk(0, 1).tolist() != plan.chunk(5, 1).tolist()  # same place, next epoch: another order
    assert plan.chunk(0, 1).tolist() != ShardPlan(seed=2, size=500, images_per_chunk=50, shards=2).chunk(0, 1).tolist()


def test_anyone_can_recompute_who_had_a_post() -> None:
    plan = ShardPlan(seed=3, size=1_013, images_per_chunk=50, shards=4)
    for epoch in (0, 2):
        owner = {}
        for r in range(epoch * plan.rounds_per_epoch, (epoch + 1) * plan.rounds_per_epoch):
            for s in range(4):
                owner.update((p, (r, s)) for p in plan.chunk(r, s).tolist())
        assert all(plan.locate(p, epoch) == owner[p] for p in range(1_013))


def test_chunk_sizes_are_balanced_and_bounded() -> None:
    plan = ShardPlan(seed=0, size=10_050, images_per_chunk=1000, shards=2)  # 11 full chunks -> 6 rounds of 2
    sizes = {len(plan.chunk(r, s)) for r in range(plan.rounds_per_epoch) for s in range(2)}
    assert max(sizes) <= 1000 and max(sizes) - min(sizes) <= 1


def test_slots_from_a_membership_view() -> None:
    peers = [f"Qm{i:04d}" for i in range(20)]
    slots = assign_slots(9, peers, 32)
    assert len(set(slots.values())) == 20
    assert assign_slots(9, list(reversed(peers)), 32) == slots  # listing order does not matter
    # more peers than slots: every slot is used, and none more than twice
    crowded = assign_slots(9, [f"p{i}" for i in range(40)], 32)
    counts = np.bincount(list(crowded.values()), minlength=32)
    assert counts.min() >= 1 and counts.max() <= 2


def test_a_peer_alone_takes_its_preferred_slot_every_time() -> None:
    assert assign_slots(5, ["mother"], 16) == {"mother": preferred_slot(5, "mother", 16)}
    assert preferred_slot(5, "mother", 16) == slot_preferences(5, "mother", 16)[0]
    assert sorted(slot_preferences(5, "mother", 16)) == list(range(16))
    spread = {preferred_slot(5, f"peer{i}", 16) for i in range(200)}
    assert len(spread) == 16  # preferences are spread over all slots


def test_bad_arguments() -> None:
    plan = ShardPlan(seed=0, size=10, images_per_chunk=5, shards=2)
    with pytest.raises(ValueError, match="slot"):
        plan.chunk(0, 2)
    with pytest.raises(ValueError, match="round"):
        plan.chunk(-1, 0)
    with pytest.raises(ValueError, match="size"):
        ShardPlan(seed=0, size=0, images_per_chunk=5, shards=2)


def test_a_cohort_that_starts_together_gets_the_slots_assign_slots_gives() -> None:
    peers = [f"peer{i}" for i in range(3)]
    chosen = {me: choose_slot(42, me, None, {p: None for p in peers if p != me}, 4) for me in peers}
    assert chosen == assign_slots(42, peers, 4) and len(set(chosen.values())) == 3


def test_a_newcomer_takes_a_free_slot_and_the_others_keep_theirs() -> None:
    held = assign_slots(42, ["a", "b", "c"], 4)
    new = choose_slot(42, "d", None, held, 4)
    assert new not in held.values()
    for me, slot in held.items():  # nobody moves for the newcomer
        others = {**{p: s for p, s in held.items() if p != me}, "d": new}
        assert choose_slot(42, me, slot, others, 4) == slot


def test_two_peers_on_one_slot_part_after_one_round() -> None:
    winner, loser = assign_slots(7, ["x", "y"], 8)  # served in priority order: the first keeps a shared slot
    # both took slot 3 (e.g. they started at the same moment without seeing each other)
    assert choose_slot(7, winner, 3, {loser: 3}, 8) == 3
    moved = choose_slot(7, loser, 3, {winner: 3}, 8)
    assert moved != 3 and choose_slot(7, loser, moved, {winner: 3}, 8) == moved  # and it stays there


def test_more_peers_than_slots_share_the_preferred_one() -> None:
    others = {"a": 0, "b": 1}
    assert choose_slot(42, "c", None, others, 2) == preferred_slot(42, "c", 2)
