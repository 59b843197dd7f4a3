"""Aspect buckets (the aspect-ratio groups; "bucket" alone is where files live, data/bucket.py): their
generation, assignment, resizing and a one-aspect-bucket-per-batch sampler."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

from sdswarm.data.images import to_rgb


@dataclass(frozen=True, order=True)
class AspectBucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def area(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def _sort_key(bucket: AspectBucket) -> tuple[float, int, int]:
    # Portrait -> square -> landscape, so tables and sampler order read naturally.
    return (bucket.aspect, bucket.width, bucket.height)


def make_aspect_buckets(
    resolution: int, side_min: int, side_max: int, step: int = 64, max_ratio: float = 2.0
) -> list[AspectBucket]:
    """Buckets whose sides are multiples of `step` in [side_min, side_max], area <= resolution**2 and
    aspect in [1/max_ratio, max_ratio]. For every width only the largest fitting height is kept (and vice
    versa), so each bucket spends the whole area budget; the square bucket of the largest valid side
    <= resolution is always included. Sorted by aspect ratio (portrait first)."""
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if max_ratio < 1.0:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    if side_min <= 0:
        raise ValueError(f"side_min must be positive, got {side_min}")
    if side_min > side_max:
        raise ValueError(f"side_min ({side_min}) > side_max ({side_max})")
    if side_min % step or side_max % step:
        raise ValueError(f"side_min ({side_min}) and side_max ({side_max}) must be multiples of {step=}")

    sides = range(side_min, side_max + 1, step)
    max_area = resolution * resolution

    def fits(w: int, h: int) -> bool:
        # Compare ratios by cross-multiplication so e.g. exactly 2:1 is not lost to float rounding.
        return w * h <= max_area and w <= max_ratio * h and h <= max_ratio * w

    buckets: set[AspectBucket] = set()
    for a in sides:
        best = max((b for b in sides if fits(a, b)), default=None)
        if best is not None:
            buckets.add(AspectBucket(a, best))
            buckets.add(AspectBucket(best, a))  # the same rule with the roles of width and height swapped

    square = [s for s in sides if s <= resolution]
    if square:
        buckets.add(AspectBucket(square[-1], square[-1]))
    if not buckets:
        raise ValueError(
            f"no bucket fits: resolution={resolution}, sides in [{side_min}, {side_max}] step {step}, "
            f"max_ratio={max_ratio} (side_min**2 must be <= resolution**2)"
        )
    return sorted(buckets, key=_sort_key)


def assign_aspect_bucket(width: int, height: int, buckets: Sequence[AspectBucket]) -> AspectBucket:
    """The aspect bucket with the nearest aspect ratio in log space (2:1 and 1:2 are equally far from 1:1);
    ties -> larger area."""
    if not buckets:
        raise ValueError("no buckets to assign to")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    dist = [abs(math.log(b.aspect) - target) for b in buckets]
    best = min(dist)
    # Tolerance so that mathematically equal distances count as a tie despite float rounding.
    tied = [b for b, d in zip(buckets, dist, strict=True) if d <= best + 1e-12]
    return max(tied, key=lambda b: (b.area, b.width))


def resize_to_aspect_bucket(image: Image.Image, bucket: AspectBucket) -> Image.Image:
    """Scale (LANCZOS) so the image covers the bucket, then center-crop to exactly the bucket size.
    Returns RGB; transparent areas are composited on white rather than left as arbitrary colour."""
    if image.mode != "RGB":  # images.decode already gives RGB: no copy then
        image = to_rgb(image)

    w, h = image.size
    scale = max(bucket.width / w, bucket.height / h)
    # max() guards against rounding leaving the covering side one pixel short.
    new_w = max(bucket.width, round(w * scale))
    new_h = max(bucket.height, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left = (new_w - bucket.width) // 2
    top = (new_h - bucket.height) // 2
    return image.crop((left, top, left + bucket.width, top + bucket.height))


class AspectBatchSampler:
    """Batches of item indices, each batch drawn from a single bucket and always exactly `batch_size` long.

    A bucket's last partial batch is topped up with other items of the same bucket (the next ones in that
    bucket's order in this pass, wrapping around), so no item is dropped and small buckets still train; a bucket
    smaller than batch_size yields one batch with repeats. Usable as a DataLoader `batch_sampler`
    (call set_epoch, DataLoader's name for it, before each pass)."""

    def __init__(self, bucket_of: Sequence[AspectBucket], batch_size: int, shuffle: bool = True, seed: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        groups: dict[AspectBucket, list[int]] = {}
        for index, bucket in enumerate(bucket_of):
            groups.setdefault(bucket, []).append(index)
        # Fixed bucket order: the RNG consumption (and so the result) must not depend on dict insertion order.
        self.groups: dict[AspectBucket, list[int]] = {b: groups[b] for b in sorted(groups, key=_sort_key)}

    def counts(self) -> dict[AspectBucket, int]:
        return {b: len(items) for b, items in self.groups.items()}

    def __len__(self) -> int:
        return sum(math.ceil(len(items) / self.batch_size) for items in self.groups.values())

    def batches(self, pass_index: int) -> list[list[int]]:
        """The batches of one pass: an order of their own each pass, the same for the same (seed, pass)."""
        # String seeds are hashed with SHA-512 by `random`, so this is stable across processes and runs.
        rng = random.Random(f"{self.seed}:{pass_index}")
        out: list[list[int]] = []
        for items in self.groups.values():
            order = list(items)
            if self.shuffle:
                rng.shuffle(order)
            n = len(order)
            for start in range(0, n, self.batch_size):
                out.append([order[i % n] for i in range(start, start + self.batch_size)])
        if self.shuffle:
            rng.shuffle(out)
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))


def aspect_bucket_table(buckets: Sequence[AspectBucket], counts: Mapping[AspectBucket, int]) -> str:
    """Human-readable table (size, aspect, item count) of all buckets, including empty ones."""
    rows = [(str(b), f"{b.aspect:.3f}", str(counts.get(b, 0))) for b in buckets]
    # Items in buckets not listed would otherwise silently vanish from the total.
    listed = set(buckets)
    extra = sum(c for b, c in counts.items() if b not in listed)
    header = ("bucket", "aspect", "count")
    footer = ("total", "", str(sum(counts.get(b, 0) for b in buckets) + extra))
    widths = [max(len(r[i]) for r in [header, footer, *rows]) for i in range(3)]

    def line(r: tuple[str, str, str]) -> str:
        return f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}"

    sep = "-" * len(line(header))
    lines = [line(header), sep, *(line(r) for r in rows), sep]
    if extra:
        lines.append(line(("(other)", "", str(extra))))
    lines.append(line(footer))
    return "\n".join(lines)
