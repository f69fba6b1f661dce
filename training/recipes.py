"""Per-family defaults, from the recipes the anchor trainers ship (DESIGN.md section 7).

Nodes expose "0 = auto" widgets that resolve here, so one workflow works across families and a user
who sets a value always wins.
"""
from __future__ import annotations

from dataclasses import dataclass

from .protocol import Family, Prediction, TargetPreset
from .timesteps import TimestepSampling


@dataclass(frozen=True)
class LoraRecipe:
    rank: int
    learning_rate: float
    targets: TargetPreset
    gradient_checkpointing: bool
    shift: float | None = None      # the shift 'shift' sampling trains with; None: the model's inference shift


LORA_RECIPES = {
    Family.SD15: LoraRecipe(16, 1e-4, TargetPreset.ATTENTION_MLP, False),
    Family.SDXL: LoraRecipe(16, 1e-4, TargetPreset.ATTENTION_MLP, True),
    Family.FLUX: LoraRecipe(16, 1e-4, TargetPreset.ATTENTION_MLP, True),
    # musubi-tuner's HunyuanVideo default: every linear of the double- and single-stream blocks.
    Family.HUNYUAN_VIDEO: LoraRecipe(32, 2e-4, TargetPreset.ALL_LINEAR, True),
}

# Models this large train with gradient checkpointing by default (activations dominate memory).
CHECKPOINTING_PARAMETER_THRESHOLD = 1_000_000_000


def default_timestep_sampling(prediction: Prediction) -> TimestepSampling:
    """Flow models train on the shifted schedule they sample with; eps / v models uniformly."""
    return TimestepSampling.SHIFT if prediction is Prediction.FLOW else TimestepSampling.UNIFORM
