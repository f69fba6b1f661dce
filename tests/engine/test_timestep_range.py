"""Timestep ranges (issue 18, Wan 2.2 A14B experts): samples stay inside [min, max], inside the range they
follow the configured sampler's own distribution, and the training loop samples only there."""
import math

import pytest
import torch

from comfyui_dojo.training.adapters import AdapterConfig, attach_adapter
from comfyui_dojo.training.batches import BatchSchedule
from comfyui_dojo.training.loop import Precision, TrainConfig, train
from comfyui_dojo.training.protocol import TargetPreset
from comfyui_dojo.training.timesteps import TimestepSampling, sample_timesteps, shift_time

from helpers import tiny_samples, tiny_unet_model

N = 20_000
KINDS = list(TimestepSampling)
# Wan 2.2 T2V's expert boundary (musubi-tuner, ai-toolkit): high-noise t >= 0.875, low-noise t < 0.875.
RANGES = [(0.875, 1.0), (0.0, 0.875), (0.3, 0.6)]


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((cdf_a - cdf_b).abs().max())


def ks_critical(n: int, m: int, alpha: float = 1e-6) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def restricted_reference(kind, lo, hi, shift, want=N) -> torch.Tensor:
    """The configured distribution restricted to [lo, hi], by rejection from the full-range sampler."""
    g = torch.Generator().manual_seed(12345)
    kept = []
    while sum(len(k) for k in kept) < want:
        t = sample_timesteps(kind, 200_000, g, shift=shift)
        kept.append(t[(t >= lo) & (t <= hi)])
    return torch.cat(kept)[:want]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t_range", RANGES)
def test_samples_stay_inside_the_range_with_the_configured_distribution(kind, t_range):
    lo, hi = t_range
    shift = 3.0
    t = sample_timesteps(kind, N, torch.Generator().manual_seed(0), shift=shift, t_range=t_range)
    assert t.dtype == torch.float32 and t.shape == (N,)
    assert bool((t >= lo).all()) and bool((t <= hi).all()), (float(t.min()), float(t.max()))
    reference = restricted_reference(kind, lo, hi, shift)
    critical = ks_critical(N, len(reference))
    assert ks_distance(t, reference) < critical
    if kind is TimestepSampling.UNIFORM:
        return  # a squeezed uniform is the restricted uniform: no wrong alternative to tell apart
    # The check has power: squeezing the full distribution into the range (musubi-tuner without
    # --preserve_distribution_shape) is a different distribution, and the same statistic says so.
    squeezed = lo + sample_timesteps(kind, N, torch.Generator().manual_seed(0), shift=shift) * (hi - lo)
    assert ks_distance(squeezed, reference) > 2 * critical


def test_the_full_range_samples_exactly_as_before():
    """Existing runs (and their resumes) keep their bits: the full range takes the unrestricted path."""
    for kind in KINDS:
        a = sample_timesteps(kind, 64, torch.Generator().manual_seed(7), shift=3.0)
        b = sample_timesteps(kind, 64, torch.Generator().manual_seed(7), shift=3.0, t_range=(0.0, 1.0))
        assert torch.equal(a, b)
    z = torch.randn(64, generator=torch.Generator().manual_seed(7))
    expected = shift_time(torch.sigmoid(z), 3.0).clamp(1e-4, 1 - 1e-4)
    assert torch.equal(sample_timesteps(TimestepSampling.SHIFT, 64, torch.Generator().manual_seed(7), shift=3.0),
                       expected)


def test_the_two_experts_split_the_noise_levels_at_the_boundary():
    high = sample_timesteps(TimestepSampling.SHIFT, N, torch.Generator().manual_seed(1), shift=5.0, t_range=(0.875, 1.0))
    low = sample_timesteps(TimestepSampling.SHIFT, N, torch.Generator().manual_seed(1), shift=5.0, t_range=(0.0, 0.875))
    assert float(high.min()) >= 0.875 and float(low.max()) <= 0.875
    full = sample_timesteps(TimestepSampling.SHIFT, N, torch.Generator().manual_seed(1), shift=5.0)
    share_high = float((full >= 0.875).double().mean())
    assert 0.05 < share_high < 0.95   # both experts' ranges carry real probability mass at shift 5


@pytest.mark.parametrize("t_range", [(0.9, 0.5), (-0.1, 0.5), (0.5, 1.2), (0.5, 0.5), (float("nan"), 1.0)])
def test_bad_ranges_are_refused_naming_the_inputs(t_range):
    with pytest.raises(ValueError, match="timestep_min.*timestep_max"):
        sample_timesteps(TimestepSampling.UNIFORM, 4, torch.Generator().manual_seed(0), t_range=t_range)
    with pytest.raises(ValueError, match="timestep_min"):
        TrainConfig(steps=2, timestep_range=t_range).validate()


class RecordingModel:
    """The tiny UNet, recording the training times the loop asks it to predict at."""

    def __init__(self, model):
        self.inner, self.seen = model, []
        self.family, self.schedule, self.unet = model.family, model.schedule, model.unet

    def predict(self, noisy, t, cond):
        self.seen.append(t.detach().clone())
        return self.inner.predict(noisy, t, cond)

    def adaptable_modules(self, preset):
        return self.inner.adaptable_modules(preset)


def test_the_loop_trains_only_inside_the_range_and_records_it():
    model = RecordingModel(tiny_unet_model())
    adapter = attach_adapter(model.unet, model.adaptable_modules(TargetPreset.ATTENTION), AdapterConfig(rank=2, alpha=2))
    config = TrainConfig(steps=6, learning_rate=1e-4, precision=Precision.FP32, timestep_range=(0.875, 1.0),
                         timestep_sampling=TimestepSampling.SHIFT, shift=3.0)
    train(model, adapter, BatchSchedule(tiny_samples(), 3, seed=0), config)
    seen = torch.cat(model.seen)
    assert len(seen) == 18 and float(seen.min()) >= 0.875
    assert config.to_dict()["timestep_range"] == [0.875, 1.0]
