"""Training-time samplers: where on the noise schedule each training sample lands (t in [0, 1]).

Pure functions of a private generator, so the same seed gives the same timesteps and the global RNG is
never touched. `shift` samples like `sigmoid` and then remaps t the way flow models are shifted at
inference (s*t / (1 + (s-1)*t)), moving training towards the noisier steps (musubi-tuner's "shift").

A `t_range` (lo, hi) keeps every sample inside [lo, hi] with the sampler's own distribution restricted
to that range (musubi-tuner's min/max timestep with --preserve_distribution_shape), e.g. one Wan 2.2
A14B expert's share of the noise levels. Each sampler is a monotone map of one uniform or normal draw,
so the restriction is exact with one draw per sample: the draw comes from the base distribution
truncated to the pre-image of the range (inverse CDF), never from a rejection loop.
"""
from __future__ import annotations

import enum
import math

import torch


class TimestepSampling(str, enum.Enum):
    UNIFORM = "uniform"
    LOGIT_NORMAL = "logit_normal"
    SIGMOID = "sigmoid"
    SHIFT = "shift"


FULL_RANGE = (0.0, 1.0)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of `shift_time`."""
    return t / (shift - (shift - 1) * t)


def check_range(t_range: tuple[float, float], names: tuple[str, str] = ("timestep_min", "timestep_max")) -> None:
    lo, hi = t_range
    if not (0.0 <= lo < hi <= 1.0) or not all(math.isfinite(v) for v in t_range):
        raise ValueError(f"{names[0]} ({lo}) must be below {names[1]} ({hi}), both in [0, 1] (0 = clean, 1 = pure "
                         "noise); e.g. 0.875 .. 1 for Wan 2.2's high-noise expert, 0 .. 0.875 for its low-noise one")


def sample_timesteps(kind: TimestepSampling, batch: int, generator: torch.Generator, *,
                     shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0,
                     sigmoid_scale: float = 1.0, t_range: tuple[float, float] = FULL_RANGE) -> torch.Tensor:
    """`batch` training times in (0, 1), float32 on CPU; inside `t_range` when it is narrower than (0, 1)."""
    kind = TimestepSampling(kind)
    if tuple(t_range) != FULL_RANGE:
        return _sample_in_range(kind, batch, generator, tuple(t_range), shift, logit_mean, logit_std, sigmoid_scale)
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


def _sample_in_range(kind: TimestepSampling, batch: int, generator: torch.Generator, t_range: tuple[float, float],
                     shift: float, logit_mean: float, logit_std: float, sigmoid_scale: float) -> torch.Tensor:
    check_range(t_range)
    lo, hi = (torch.tensor(v, dtype=torch.float64) for v in t_range)
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    if kind is TimestepSampling.UNIFORM:
        t = lo + u * (hi - lo)
    else:
        # t = f(z) with z standard normal and f increasing: z's bounds are f^-1(lo), f^-1(hi).
        if kind is TimestepSampling.LOGIT_NORMAL:
            to_t = lambda z: torch.sigmoid(z * logit_std + logit_mean)
            to_z = lambda t: (torch.logit(t) - logit_mean) / logit_std
        elif kind is TimestepSampling.SIGMOID:
            to_t = lambda z: torch.sigmoid(z * sigmoid_scale)
            to_z = lambda t: torch.logit(t) / sigmoid_scale
        else:
            to_t = lambda z: shift_time(torch.sigmoid(z * sigmoid_scale), shift)
            to_z = lambda t: torch.logit(unshift_time(t, shift)) / sigmoid_scale
        c_lo, c_hi = torch.special.ndtr(to_z(lo)), torch.special.ndtr(to_z(hi))   # logit(0) = -inf -> 0
        t = to_t(torch.special.ndtri(c_lo + u * (c_hi - c_lo)))
    # Rounding must not carry a sample over a boundary the other expert owns.
    t = torch.minimum(torch.maximum(t, lo), hi).float()
    return t.clamp(max(1e-4, float(t_range[0])), min(1 - 1e-4, float(t_range[1])))
