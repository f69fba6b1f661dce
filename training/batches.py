"""Batches from an encoded (cached) dataset, in an order that is a pure function of (seed, step).

Because the order, the noise and the timesteps of step k depend only on the seed and k, a run resumed
at step k sees exactly what the uninterrupted run saw: resume needs no RNG state beyond the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocol import Conditioning


@dataclass
class Sample:
    latent: torch.Tensor            # [C, H, W] or [C, T, H, W], model space before process_latent_in
    cond: Conditioning              # batch dimension 1


@dataclass
class Batch:
    latents: torch.Tensor
    cond: Conditioning
    indices: list[int]


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A private generator for one step (and one use within it, `stream`)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2 ** 63))


def _collate_extra(name: str, values: list):
    if all(torch.is_tensor(v) for v in values):
        return torch.cat(values)
    if any(v != values[0] for v in values):
        raise ValueError(f"cannot batch conditionings whose '{name}' differs ({values[0]!r} vs others); "
                         "use batch size 1 or encode them alike")
    return values[0]


def collate(samples: list[Sample], indices: list[int]) -> Batch:
    cond = Conditioning(
        context=torch.cat([s.cond.context for s in samples]),
        pooled=None if samples[0].cond.pooled is None else torch.cat([s.cond.pooled for s in samples]),
        extra={k: _collate_extra(k, [s.cond.extra[k] for s in samples]) for k in samples[0].cond.extra},
    )
    return Batch(torch.stack([s.latent for s in samples]), cond, indices)


class BatchSchedule:
    """Epochs of shuffled batches; a batch never mixes latent shapes (buckets) or text lengths."""

    def __init__(self, samples: list[Sample], batch_size: int, seed: int):
        if not samples:
            raise ValueError("the dataset is empty: nothing to train on")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1 (got {batch_size})")
        self.samples = samples
        self.seed = seed
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault((tuple(s.latent.shape), tuple(s.cond.context.shape[1:])), []).append(i)
        self.groups = list(groups.values())
        # A bucket smaller than the batch size still trains, in smaller batches.
        self.batch_size = batch_size
        self.batches_per_epoch = sum(-(-len(g) // batch_size) for g in self.groups)
        self._cached_epoch: tuple[int, list[list[int]]] | None = None

    def _epoch(self, epoch: int) -> list[list[int]]:
        g = step_generator(self.seed, epoch, stream=1)
        batches = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def batch(self, step: int) -> Batch:
        epoch, index = divmod(step, self.batches_per_epoch)
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            self._cached_epoch = (epoch, self._epoch(epoch))
        indices = self._cached_epoch[1][index]
        return collate([self.samples[i] for i in indices], indices)
