"""Batches for the trainer: round r's chunk of pairs in one pass, one aspect bucket per batch, decoded ahead.

A position (round, batch) says where the stream is, so a resumed run continues where it stopped: a round's
batches depend only on (seed, round) and the pairs its chunk yielded. Images are decoded in threads (Pillow
releases the GIL while decoding and resizing), so no worker processes are forked beside hivemind's.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from sdswarm.data import images
from sdswarm.data.aspect import (
    AspectBatchSampler,
    AspectBucket,
    aspect_bucket_table,
    assign_aspect_bucket,
    resize_to_aspect_bucket,
)
from sdswarm.data.captions import shuffle_tags
from sdswarm.data.chunks import DataStats
from sdswarm.data.workdir import Pair

log = logging.getLogger(__name__)

MAX_EMPTY_PASSES = 3  # rounds in a row with no usable pair: the bucket or the index is broken, say so


class Chunks(Protocol):
    def pairs(self, round_index: int) -> list[Pair]: ...

    def stats(self) -> DataStats: ...

    def close(self) -> None: ...


class FixedChunks:
    """The same pairs every round (a folder already on disk, tests, benchmarks)."""

    def __init__(self, pairs: Sequence[Pair]) -> None:
        self._pairs = list(pairs)

    def pairs(self, round_index: int) -> list[Pair]:
        return self._pairs

    def stats(self) -> DataStats:
        return DataStats(pairs_ready=len(self._pairs))

    def close(self) -> None:
        pass


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1], all from one bucket
    captions: list[str]


@dataclass(frozen=True)
class CaptionShuffle:
    separator: str = ", "
    keep_first: int = 0


@dataclass
class RoundPlan:
    pairs: list[Pair]
    bucket_of: list[AspectBucket]
    batches: list[list[int]]  # indices into pairs, one bucket each


def to_tensor(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class BatchStream:
    """Endless batches, round after round; `iterate(round, batch)` starts anywhere."""

    def __init__(
        self,
        chunks: Chunks,
        buckets: Sequence[AspectBucket],
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        num_workers: int = 0,
        caption_shuffle: CaptionShuffle | None = None,
        max_pixels: int = images.DEFAULT_MAX_PIXELS,
    ) -> None:
        self.chunks, self.buckets = chunks, list(buckets)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.num_workers, self.caption_shuffle, self.max_pixels = num_workers, caption_shuffle, max_pixels
        self._plans: dict[int, RoundPlan] = {}
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="sdswarm-load") if num_workers else None

    def plan(self, round_index: int) -> RoundPlan:
        """The pairs and the batches (lists of indices, one bucket each) of one round."""
        if round_index not in self._plans:
            pairs, bucket_of = [], []
            for pair in self.chunks.pairs(round_index):
                if pair.size is None:
                    pair.size = self._probe(pair)  # once: a fixed chunk is planned again each round
                size = pair.size
                if size is not None:
                    pairs.append(pair)
                    bucket_of.append(assign_aspect_bucket(*size, self.buckets))
            sampler = AspectBatchSampler(bucket_of, self.batch_size, shuffle=self.shuffle, seed=self.seed)
            self._plans = {p: v for p, v in self._plans.items() if p == round_index - 1}  # describe() then round 0
            self._plans[round_index] = RoundPlan(pairs, bucket_of, sampler.batches(round_index) if pairs else [])
        return self._plans[round_index]

    def describe(self, round_index: int = 0) -> str:
        return aspect_bucket_table(self.buckets, Counter(self.plan(round_index).bucket_of))

    def stats(self) -> DataStats:
        return self.chunks.stats()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.chunks.close()

    def iterate(self, start_round: int = 0, start_batch: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """Yield (round, index of the batch in its round, batch) from the given position on."""
        round_index, skip, empty = start_round, start_batch, 0
        while True:
            plan = self.plan(round_index)
            if not plan.pairs:
                empty += 1
                log.warning("round %d has no usable pairs (%s)", round_index, self.stats().summary())
                if empty >= MAX_EMPTY_PASSES:
                    raise RuntimeError(f"{empty} passes in a row without a usable pair: check data.source and "
                                       f"data.index ({self.stats().summary()})")
            else:
                empty = 0
            for batch_index, batch in self._load(round_index, plan, skip):
                yield round_index, batch_index, batch
            round_index, skip = round_index + 1, 0

    def _load(self, round_index: int, plan: RoundPlan, skip: int) -> Iterator[tuple[int, Batch]]:
        todo = list(enumerate(plan.batches))[skip:]
        if self._pool is None:
            for batch_index, indices in todo:
                if (batch := self._batch(round_index, plan, indices)) is not None:
                    yield batch_index, batch
            return
        pending: deque[tuple[int, Future[Batch | None]]] = deque()
        try:
            for batch_index, indices in todo:
                pending.append((batch_index, self._pool.submit(self._batch, round_index, plan, indices)))
                if len(pending) > self.num_workers:  # one batch ready ahead; each holds B x 3 x H x W floats
                    yield from self._ready(pending.popleft())
            while pending:
                yield from self._ready(pending.popleft())
        finally:  # the consumer stopped early: do not decode batches no one will take
            for _, future in pending:
                future.cancel()

    @staticmethod
    def _ready(item: tuple[int, Future[Batch | None]]) -> Iterator[tuple[int, Batch]]:
        batch_index, future = item
        if (batch := future.result()) is not None:
            yield batch_index, batch

    def _batch(self, round_index: int, plan: RoundPlan, indices: list[int]) -> Batch | None:
        pixels, captions = [], []
        for i in indices:
            pair, bucket = plan.pairs[i], plan.bucket_of[i]
            try:
                image = images.decode(pair.image, pair.image.suffix[1:], max_pixels=self.max_pixels,
                                      cover=(bucket.width, bucket.height))
            except images.ImageRejected as rejected:  # checked when fetched; only a damaged disk gets here
                log.warning("%s left out of its batch: %s", pair.image, rejected)
                continue
            pixels.append(to_tensor(resize_to_aspect_bucket(image, bucket)))
            captions.append(self._caption(pair, round_index))
        if not pixels:
            return None
        for j in range(len(indices) - len(pixels)):  # keep the batch size: repeat what did load
            pixels.append(pixels[j % len(pixels)])
            captions.append(captions[j % len(captions)])
        return Batch(pixels=torch.stack(pixels), captions=captions)

    def _caption(self, pair: Pair, round_index: int) -> str:
        s = self.caption_shuffle
        if s is None:
            return pair.caption
        rng = random.Random(f"{self.seed}:caption:{round_index}:{pair.image.name}")  # same on a resumed run
        return shuffle_tags(pair.caption, s.separator, s.keep_first, rng)

    def _probe(self, pair: Pair) -> tuple[int, int] | None:
        try:
            info = images.probe(pair.image, max_pixels=self.max_pixels)
        except images.ImageRejected as rejected:
            log.warning("%s left out: %s", pair.image, rejected)
            return None
        return info.width, info.height
