"""ComfyUI side of the gradient protection (issue 11): which blocks of a ComfyUI diffusion model to
protect and checkpoint, and the ops to swap for differentiable ones while training."""
from __future__ import annotations

import contextlib

from torch import nn

from ..training.grad_safety import protected_training
from .comfy_compat import rope_substitutions

# Flux and HunyuanVideo (comfy/ldm/flux/layers.py blocks): residuals are added in place in both.
BLOCK_LISTS = ("double_blocks", "single_blocks")


def diffusion_model_of(model) -> nn.Module:
    """The diffusion network of a ModelPatcher, a BaseModel, or the network itself."""
    model = getattr(model, "model", model)  # ModelPatcher -> BaseModel
    return getattr(model, "diffusion_model", model)


def transformer_blocks(model) -> list[nn.Module]:
    """The Flux-style transformer blocks of a ComfyUI model, double-stream blocks first."""
    net = diffusion_model_of(model)
    blocks = [b for name in BLOCK_LISTS for b in getattr(net, name, None) or ()]
    if not blocks:
        raise ValueError(f"{type(net).__name__} has none of {BLOCK_LISTS}; cannot protect its gradients")
    return blocks


@contextlib.contextmanager
def protected_comfy_training(model, checkpointing: bool):
    """Forward/backward through a ComfyUI Flux or HunyuanVideo model with correct gradients; see
    `training.grad_safety.protected_training`. Nothing stays installed after exit."""
    with protected_training(transformer_blocks(model), checkpointing, rope_substitutions()) as stats:
        yield stats
