"""Per-family defaults, from the recipes the anchor trainers ship (DESIGN.md section 7): each family's
`LoraRecipe` is its spec's `recipe` (training/families).

Nodes expose "0 = auto" widgets that resolve there, so one workflow works across families and a user
who sets a value always wins.
"""
from __future__ import annotations

from dataclasses import dataclass

from .protocol import Prediction, TargetPreset
from .timesteps import TimestepSampling


@dataclass(frozen=True)
class LoraRecipe:
    rank: int
    learning_rate: float
    targets: TargetPreset
    gradient_checkpointing: bool


# Models this large train with gradient checkpointing by default (activations dominate memory).
CHECKPOINTING_PARAMETER_THRESHOLD = 1_000_000_000


def default_timestep_sampling(prediction: Prediction) -> TimestepSampling:
    """Flow models train on the shifted schedule they sample with; eps / v models uniformly."""
    return TimestepSampling.SHIFT if prediction is Prediction.FLOW else TimestepSampling.UNIFORM
