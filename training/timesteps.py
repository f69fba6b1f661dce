"""Training-time samplers: where on the noise schedule each training sample lands (t in [0, 1]).

Pure functions of a private generator, so the same seed gives the same timesteps and the global RNG is
never touched. `shift` samples like `sigmoid` and then remaps t the way flow models are shifted at
inference (s*t / (1 + (s-1)*t)), moving training towards the noisier steps (musubi-tuner's "shift").
"""
from __future__ import annotations

import enum

import torch


class TimestepSampling(str, enum.Enum):
    UNIFORM = "uniform"
    LOGIT_NORMAL = "logit_normal"
    SIGMOID = "sigmoid"
    SHIFT = "shift"


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(kind: TimestepSampling, batch: int, generator: torch.Generator, *,
                     shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0,
                     sigmoid_scale: float = 1.0) -> torch.Tensor:
    """`batch` training times in (0, 1), float32 on CPU."""
    kind = TimestepSampling(kind)
    if kind is TimestepSampling.UNIFORM:
        t = torch.rand(batch, generator=generator)
    elif kind is TimestepSampling.LOGIT_NORMAL:
        t = torch.sigmoid(torch.randn(batch, generator=generator) * logit_std + logit_mean)
    elif kind is TimestepSampling.SIGMOID:
        t = torch.sigmoid(torch.randn(batch, generator=generator) * sigmoid_scale)
    else:
        t = shift_time(torch.sigmoid(torch.randn(batch, generator=generator) * sigmoid_scale), shift)
    # Keep away from the exact ends, where some targets and schedules are degenerate.
    return t.clamp(1e-4, 1 - 1e-4)
