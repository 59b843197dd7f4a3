"""Batches for the trainer: a chunk of work-dir pairs per pass, one aspect bucket per batch, loaded ahead."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from sdswarm.data.buckets import Bucket, BucketBatchSampler, assign_bucket, bucket_table, resize_to_bucket
from sdswarm.data.workdir import Pair

log = logging.getLogger(__name__)


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1], all from one bucket
    captions: list[str]


def load_rgb(path) -> Image.Image:
    """Open an image upright and in RGB; transparency is composited on white."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class PairDataset(torch.utils.data.Dataset):
    """Pairs resized to their bucket; indexable so a DataLoader can load batches in worker processes."""

    def __init__(self, pairs: Sequence[Pair], bucket_of: Sequence[Bucket]) -> None:
        self.pairs, self.bucket_of = list(pairs), list(bucket_of)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        pair = self.pairs[index]
        return to_tensor(resize_to_bucket(load_rgb(pair.image), self.bucket_of[index])), pair.caption


def collate(items: list[tuple[torch.Tensor, str]]) -> Batch:
    return Batch(pixels=torch.stack([pixels for pixels, _ in items]), captions=[caption for _, caption in items])


class BatchStream:
    """Endless batches over `pairs`, pass after pass; each pass trains a chunk of `images_per_chunk` pairs.

    A position (pass, batch) says where the stream is, so a resumed run continues where it stopped.
    The chunk and the order of a pass depend only on (seed, pass): any run can recompute them.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        buckets: Sequence[Bucket],
        *,
        batch_size: int,
        images_per_chunk: int,
        shuffle: bool,
        seed: int,
        num_workers: int = 0,
    ) -> None:
        if not pairs:
            raise ValueError("no training pairs: the work directory holds no image + caption pairs")
        self.pairs, self.buckets = list(pairs), list(buckets)
        self.batch_size, self.images_per_chunk = batch_size, images_per_chunk
        self.shuffle, self.seed, self.num_workers = shuffle, seed, num_workers
        self._sizes: dict = {}

    def chunk(self, pass_index: int) -> list[Pair]:
        if self.images_per_chunk >= len(self.pairs):
            return self.pairs
        return random.Random(f"{self.seed}:chunk:{pass_index}").sample(self.pairs, self.images_per_chunk)

    def plan(self, pass_index: int) -> tuple[PairDataset, list[list[int]]]:
        """The dataset and the batches (lists of indices, one bucket each) of one pass."""
        pairs = self.chunk(pass_index)
        bucket_of = [assign_bucket(*self._size(pair), self.buckets) for pair in pairs]
        sampler = BucketBatchSampler(bucket_of, self.batch_size, shuffle=self.shuffle, seed=self.seed)
        return PairDataset(pairs, bucket_of), sampler.batches(pass_index)

    def describe(self, pass_index: int = 0) -> str:
        dataset, _ = self.plan(pass_index)
        return bucket_table(self.buckets, Counter(dataset.bucket_of))

    def _size(self, pair: Pair) -> tuple[int, int]:
        if pair.image not in self._sizes:  # header only; upright size, as training sees it
            with Image.open(pair.image) as image:
                self._sizes[pair.image] = ImageOps.exif_transpose(image).size
        return self._sizes[pair.image]

    def iterate(self, start_pass: int = 0, start_batch: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """Yield (pass, index of the batch in its pass, batch) from the given position on."""
        pass_index, skip = start_pass, start_batch
        while True:
            dataset, batches = self.plan(pass_index)
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=batches[skip:], collate_fn=collate,
                num_workers=self.num_workers, prefetch_factor=4 if self.num_workers else None,
            )
            for offset, batch in enumerate(loader):
                yield pass_index, skip + offset, batch
            pass_index, skip = pass_index + 1, 0
