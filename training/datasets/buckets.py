"""Aspect-ratio buckets: which (h, w) each sample is trained at, how it is cropped, how batches form.

Our own small functions rather than diffusers' `generate_aspect_ratio_buckets`: that helper has no
min/max side or no-upscale rule and is missing from the diffusers versions we still support (>=0.32).
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Sequence, TypeVar

from .errors import DatasetError

T = TypeVar("T")


@dataclass(frozen=True)
class BucketConfig:
    """resolution: target area is resolution**2; step: every side is a multiple of it (the VAE
    factor times the patch size, e.g. 64); min_side / max_side bound each side; no_upscale keeps
    images smaller than the target at (about) their own size instead of enlarging them;
    random_crop picks the crop offset with the seeded generator instead of centring it."""
    resolution: int = 512
    step: int = 64
    min_side: int = 256
    max_side: int = 1024
    no_upscale: bool = False
    random_crop: bool = False

    def __post_init__(self):
        if self.step <= 0 or self.resolution < self.step:
            raise DatasetError(f"bucket step {self.step} must be positive and not above resolution {self.resolution}")
        if self.min_side > self.max_side:
            raise DatasetError(f"min_side {self.min_side} is larger than max_side {self.max_side}")
        if self.max_side < self.resolution:
            raise DatasetError(f"max_side {self.max_side} is below resolution {self.resolution}: "
                               "no square bucket would fit; raise max_side")


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """All (h, w) with sides multiples of `step` in [min_side, max_side] and area <= resolution**2,
    taking for each width the tallest such height (kohya's ladder), sorted by aspect ratio."""
    area = resolution * resolution
    lo = max(step, math.ceil(min_side / step) * step)
    hi = max_side // step * step
    buckets = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            buckets.add((h, w))
            buckets.add((w, h))
    if not buckets:
        raise DatasetError(f"no bucket fits resolution {resolution}, step {step}, sides {min_side}..{max_side}")
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to `size` (h, w) in log space (so 2:1 and 1:2 are
    equally far from 1:1); ties go to the larger bucket."""
    h, w = size
    ratio = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1]))


def bucket_for(size: tuple[int, int], config: BucketConfig,
               buckets: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The (h, w) a source of `size` trains at, or None when it is too small to give one step.

    With no_upscale, a source whose nearest bucket would need enlarging gets its own bucket: its
    size rounded down to `step` (slightly cropped, never enlarged)."""
    bucket = nearest_bucket(size, buckets)
    h, w = size
    if config.no_upscale and (bucket[0] > h or bucket[1] > w):
        if h * w > bucket[0] * bucket[1]:
            # Larger area but a side too short: scale down to the target area first.
            scale = math.sqrt(bucket[0] * bucket[1] / (h * w))
            h, w = h * scale, w * scale
        top = config.max_side // config.step * config.step
        bucket = (min(top, int(h) // config.step * config.step), min(top, int(w) // config.step * config.step))
        if min(bucket) == 0:
            return None
    return bucket


def fit(size: tuple[int, int], bucket: tuple[int, int], random_crop: bool,
        rng: random.Random) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """How to turn a source of `size` into `bucket`: the (h, w) to resize to (covering the bucket,
    aspect kept) and the crop (top, left, h, w) within it (centred, or seeded-random)."""
    h, w = size
    bh, bw = bucket
    scale = max(bh / h, bw / w)
    rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
    if random_crop:
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    return (rh, rw), (top, left, bh, bw)


def make_batches(items: Sequence[T], batch_size: int, key, rng: random.Random,
                 drop_last: bool = False) -> list[list[T]]:
    """Shuffled batches in which every item has the same `key(item)` (bucket h, w and frame count).

    Items are shuffled within each key, cut into batches, and the batches shuffled together, so an
    epoch visits every item once; a key's last batch may be short unless drop_last."""
    if batch_size < 1:
        raise DatasetError(f"batch size must be at least 1, got {batch_size}")
    groups: dict[Hashable, list[T]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    batches = []
    for group_key in sorted(groups, key=repr):  # a fixed order, so the seed alone decides the result
        group = groups[group_key]
        rng.shuffle(group)
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            if len(batch) == batch_size or not drop_last:
                batches.append(batch)
    rng.shuffle(batches)
    return batches
