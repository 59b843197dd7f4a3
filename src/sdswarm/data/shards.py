"""Which posts this peer trains in which round, with no central server.

The index's positions 0..N-1 are shuffled once per *data epoch* by a keyed permutation of the run seed (a
Feistel network with cycle-walking: any position's place, or any place's position, is computed directly,
without building an N-long array). Each epoch's shuffled order is cut into `shards * rounds_per_epoch`
consecutive, balanced chunks; round r, slot s trains chunk ``(r mod rounds_per_epoch) * shards + s`` of
epoch ``r // rounds_per_epoch``.

The guarantee, given distinct slots:
  * within one data epoch, the chunks of all (round, slot) pairs partition the index: every post is drawn
    exactly once per epoch, so two peers on different slots never train the same post in the same round
    (nor in any two rounds of one epoch), and the `shards` slots together cover the whole index each epoch;
  * everything is a pure function of (seed, N, images per chunk, shards, round, slot): a peer's data is
    reproducible from the seed, and anyone can recompute who had a post (`locate`).
A chunk holds at most `images_per_chunk` posts; when N < shards * images_per_chunk, chunks shrink to about
N / shards so that the slots stay disjoint.

Distinct slots come from `assign_slots` (rendezvous hashing with collision handling) over a membership view
all peers agree on; with no view, `preferred_slot` is a peer's first choice, and two peers collide with
probability about 1/shards. In a swarm, `choose_slot` keeps them apart as peers come and go: before each round a
peer looks at the slots the others publish, keeps its own unless a peer of higher priority holds it too, and
otherwise takes its most preferred free one. Each peer logs its slot per round, so who had a post stays
recomputable. More peers than shards necessarily share slots (and so data).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

FEISTEL_ROUNDS = 4


def _hash64(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: a cheap, well-avalanching round function (uint64 arithmetic wraps on purpose)
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A keyed bijection of [0, n): Feistel over the smallest even-bit domain >= n, cycle-walked into range."""

    def __init__(self, n: int, *key: object) -> None:
        if n < 1:
            raise ValueError(f"cannot permute an empty range (n={n})")
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half_bits) - 1)
        self.keys = [np.uint64(_hash64("feistel", *key, r)) for r in range(FEISTEL_ROUNDS)]

    def _rounds(self, x: np.ndarray, keys: list[np.uint64], inverse: bool) -> np.ndarray:
        h = np.uint64(self.half_bits)
        hi, lo = x >> h, x & self.mask
        for k in keys:
            if inverse:
                hi, lo = lo ^ (_mix(hi ^ k) & self.mask), hi
            else:
                hi, lo = lo, hi ^ (_mix(lo ^ k) & self.mask)
        return (hi << h) | lo

    def _walk(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        keys = self.keys[::-1] if inverse else self.keys
        x = self._rounds(x.astype(np.uint64), keys, inverse)
        out_of_range = x >= self.n
        while out_of_range.any():  # the domain is < 4n, so a few walks on average
            x[out_of_range] = self._rounds(x[out_of_range], keys, inverse)
            out_of_range = x >= self.n
        return x.astype(np.int64)

    def __call__(self, places: np.ndarray) -> np.ndarray:
        """The index positions at these places of the shuffled order."""
        return self._walk(np.asarray(places), inverse=False)

    def inverse(self, positions: np.ndarray) -> np.ndarray:
        """The places of these index positions in the shuffled order."""
        return self._walk(np.asarray(positions), inverse=True)


@dataclass(frozen=True)
class ShardPlan:
    seed: int
    size: int  # rows in the index
    images_per_chunk: int
    shards: int

    def __post_init__(self) -> None:
        for name in ("size", "images_per_chunk", "shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def rounds_per_epoch(self) -> int:
        return -(-self.size // (self.shards * self.images_per_chunk))

    @property
    def chunks_per_epoch(self) -> int:
        return self.shards * self.rounds_per_epoch

    def _bounds(self, k: int) -> tuple[int, int]:
        c = self.chunks_per_epoch
        return k * self.size // c, (k + 1) * self.size // c

    def _permutation(self, epoch: int) -> Permutation:
        return Permutation(self.size, "sdswarm-shards", self.seed, epoch)

    def chunk(self, round_index: int, slot: int) -> np.ndarray:
        """Index positions (0-based) that `slot` trains in round `round_index`."""
        if not 0 <= slot < self.shards:
            raise ValueError(f"slot {slot} out of range [0, {self.shards})")
        if round_index < 0:
            raise ValueError(f"round must be >= 0, got {round_index}")
        epoch, r = divmod(round_index, self.rounds_per_epoch)
        start, stop = self._bounds(r * self.shards + slot)
        return self._permutation(epoch)(np.arange(start, stop, dtype=np.uint64))

    def locate(self, position: int, epoch: int) -> tuple[int, int]:
        """(round, slot) that trains index `position` in data epoch `epoch`: who had what."""
        place = int(self._permutation(epoch).inverse(np.array([position], dtype=np.uint64))[0])
        c = self.chunks_per_epoch
        k = min(place * c // self.size, c - 1)
        while self._bounds(k)[0] > place:
            k -= 1
        while self._bounds(k)[1] <= place:
            k += 1
        return epoch * self.rounds_per_epoch + k // self.shards, k % self.shards


def slot_preferences(seed: int, peer_id: str, shards: int) -> list[int]:
    """A peer's slots in order of preference: highest rendezvous score first."""
    return sorted(range(shards), key=lambda s: (-_hash64("slot", seed, peer_id, s), s))


def preferred_slot(seed: int, peer_id: str, shards: int) -> int:
    return slot_preferences(seed, peer_id, shards)[0]


def choose_slot(seed: int, me: str, current: int | None, others: dict[str, int | None], shards: int) -> int:
    """This peer's slot for its next round, given the slots the other live peers hold (None: not chosen yet).

    A slot held by two peers stays with the one of higher priority (the order `assign_slots` serves peers in);
    peers that have not chosen yet are served as `assign_slots` would serve them, from the slots nobody holds,
    so a cohort that starts together (behind the start-up barrier) gets distinct slots at once."""
    held = {peer: slot for peer, slot in others.items() if slot is not None}
    if current is not None and not any(slot == current and _rank(seed, peer) < _rank(seed, me)
                                       for peer, slot in held.items()):
        return current
    free = set(range(shards)) - set(held.values())
    newcomers = sorted({peer for peer, slot in others.items() if slot is None} | {me}, key=lambda p: _rank(seed, p))
    for peer in newcomers:
        choice = next((slot for slot in slot_preferences(seed, peer, shards) if slot in free), None)
        if choice is None:
            break
        if peer == me:
            return choice
        free.discard(choice)
    return preferred_slot(seed, me, shards)  # more peers than slots: this one shares


def _rank(seed: int, peer: str) -> tuple[int, str]:
    return _hash64("priority", seed, peer), peer


def assign_slots(seed: int, peer_ids: Iterable[str], shards: int) -> dict[str, int]:
    """Distinct slots for a membership view (up to `shards` peers; the rest reuse slots, in turn).

    Peers are served in the order of a seeded hash of their id, each taking its most preferred free slot, so
    every peer holding the same view computes the same answer, whatever order it lists the peers in."""
    peers = sorted(set(peer_ids), key=lambda p: _rank(seed, p))
    taken: set[int] = set()
    out: dict[str, int] = {}
    for peer in peers:
        if len(taken) == shards:  # more peers than slots: start a new layer
            taken.clear()
        out[peer] = next(s for s in slot_preferences(seed, peer, shards) if s not in taken)
        taken.add(out[peer])
    return out
