"""The contract between the training loop and a denoising model.

The loop never sees a framework's model object: it sees a `DenoisingModel` that predicts the model's
native output (epsilon, v or flow velocity) for noisy latents at a training time `t` in [0, 1], and
names the modules an adapter may attach to. Implementations: `diffusers_models.py` (engine tests and
the demo) and the pack's `nodes/comfy_model.py` (ComfyUI's MODEL).
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn


class Family(str, enum.Enum):
    SD15 = "sd15"
    SDXL = "sdxl"
    FLUX = "flux"
    HUNYUAN_VIDEO = "hunyuan_video"
    # Issue 18's families (specs in training/families/<value>.py).
    WAN21 = "wan21"                      # Wan 2.1 T2V 1.3B / 14B, and Wan 2.2 A14B's two experts (same network)
    WAN22_5B = "wan22_5b"                # Wan 2.2 TI2V 5B (48-channel VAE)
    QWEN_IMAGE = "qwen_image"
    Z_IMAGE = "z_image"
    HUNYUAN_VIDEO_15 = "hunyuan_video_15"
    CHROMA = "chroma"
    GENERIC = "generic"                  # any other model ComfyUI loads (training/families/generic.py)


class Prediction(str, enum.Enum):
    EPSILON = "eps"
    V = "v"
    FLOW = "flow"


class TargetPreset(str, enum.Enum):
    """Which linear layers an adapter attaches to; each family maps these to module names."""
    ATTENTION = "attention"
    ATTENTION_MLP = "attention_mlp"
    ALL_LINEAR = "all_linear"


@dataclass(frozen=True)
class NoiseSchedule:
    """How a model mixes data and noise at training time t in [0, 1] (0 = clean, 1 = pure noise).

    Discrete (eps / v) models carry their `alphas_cumprod`; t picks the nearest of their timesteps,
    because they were trained on those integers only. Flow models use sigma = t; their inference
    `shift` is recorded so that timestep samplers can default to it.
    """
    prediction: Prediction
    alphas_cumprod: torch.Tensor | None = None
    shift: float = 1.0

    def __post_init__(self):
        discrete = self.prediction in (Prediction.EPSILON, Prediction.V)
        if discrete and self.alphas_cumprod is None:
            raise ValueError(f"a {self.prediction.value}-prediction schedule needs alphas_cumprod")

    @property
    def is_flow(self) -> bool:
        return self.prediction is Prediction.FLOW

    def timestep_index(self, t: torch.Tensor) -> torch.Tensor:
        """The discrete model timestep (0 .. N-1) nearest to t; only for eps / v schedules."""
        n = self.alphas_cumprod.shape[0]
        return (t.clamp(0, 1) * (n - 1)).round().long()

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) per sample such that noisy = alpha * x0 + sigma * noise."""
        t = t.float()
        if self.is_flow:
            return 1.0 - t, t
        ac = self.alphas_cumprod.to(t.device, torch.float64)[self.timestep_index(t)]
        return ac.sqrt().float(), (1.0 - ac).sqrt().float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (_per_sample(c, x0) for c in self.coefficients(t))
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model should output: its native training target."""
        if self.prediction is Prediction.EPSILON:
            return noise
        if self.prediction is Prediction.FLOW:
            return noise - x0
        alpha, sigma = (_per_sample(c, x0) for c in self.coefficients(t))
        return alpha * noise - sigma * x0


def _per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class Conditioning:
    """A batch of text conditioning as the family's model consumes it.

    `context` is the text encoder's hidden states [B, L, D]; `pooled` the pooled vector where the
    family has one; `extra` holds the rest by name (attention masks, SDXL size ids): tensors with a
    batch dimension, or plain numbers shared by the whole batch (ComfyUI keeps guidance as a float).
    """
    context: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device=None, dtype=None) -> "Conditioning":
        def move(x):
            if not torch.is_tensor(x):
                return x
            return x.to(device=device, dtype=dtype if x.is_floating_point() else None)
        return Conditioning(move(self.context), move(self.pooled), {k: move(v) for k, v in self.extra.items()})


@runtime_checkable
class DenoisingModel(Protocol):
    family: Family
    schedule: NoiseSchedule

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's native output (eps, v or flow velocity) for `noisy` at training time `t` [B]."""
        ...

    def adaptable_modules(self, preset: TargetPreset) -> dict[str, nn.Module]:
        """Name -> module for the layers an adapter should wrap under `preset`, in a stable order."""
        ...


def select_linears(root: nn.Module, pattern: str) -> dict[str, nn.Module]:
    """The nn.Linear layers of `root` whose qualified name matches the regular expression `pattern`."""
    regex = re.compile(pattern)
    return {name: module for name, module in root.named_modules()
            if isinstance(module, nn.Linear) and regex.search(name)}
