"""ComfyUI side of the gradient protection (issue 11): which blocks of a ComfyUI diffusion model to
protect and checkpoint, and the ops to swap for differentiable ones while training."""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..training.block_swap import block_swap
from ..training.grad_safety import protected_training
from . import comfy_compat as cc
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


# SD1.5 / SDXL UNets (openaimodel.UNetModel): the blocks checkpointing recomputes.
UNET_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


def checkpoint_units(model) -> list[nn.Module]:
    """The blocks whose activations gradient checkpointing recomputes: Flux-style transformer blocks,
    or the layers inside a UNet's input, middle and output blocks (ComfyUI's UNet calls those layers
    one by one and never the block containers, so wrapping the containers would do nothing)."""
    net = diffusion_model_of(model)
    if any(getattr(net, name, None) is not None for name in BLOCK_LISTS):
        return transformer_blocks(net)
    units = []
    for name in UNET_BLOCKS:
        part = getattr(net, name, None)
        blocks = list(part) if isinstance(part, nn.ModuleList) else [part] if isinstance(part, nn.Module) else []
        for block in blocks:
            units += list(block.children()) if isinstance(block, nn.Sequential) else [block]
    if not units:
        raise ValueError(f"{type(net).__name__} has no blocks Dojo knows how to checkpoint")
    return units


def needs_protection(model) -> bool:
    """Whether the model has blocks known to write in place into tensors autograd saved."""
    net = diffusion_model_of(model)
    return any(getattr(net, name, None) is not None for name in BLOCK_LISTS)


log = logging.getLogger("comfyui-dojo")


@contextlib.contextmanager
def training_region(model, checkpointing: bool, blocks_to_swap: int = 0,
                    device: torch.device | str = "cpu"):
    """Where a training step's forward and backward run: ComfyUI's own training flag where it has one
    (0.33: its models then use differentiable RoPE; on 0.8 Dojo substitutes comfy-kitchen's op),
    copy-on-write protection for models that write in place into saved tensors (also around their
    checkpoint recomputation), block checkpointing when asked, and with `blocks_to_swap` > 0 the last
    that many blocks streamed to `device` from the CPU for each forward (training.block_swap)."""
    with contextlib.ExitStack() as stack:
        stats = None
        stack.enter_context(cc.comfy_training_mode())
        protect = needs_protection(model)
        if checkpointing or protect:
            stats = stack.enter_context(
                protected_training(checkpoint_units(model), checkpointing, cc.training_substitutions(), protect))
        if blocks_to_swap > 0:
            if not needs_protection(model):
                # A UNet's input/output blocks are not called as modules (ComfyUI's forward_timestep_embed
                # iterates their layers), so per-block hooks would never run: refuse instead of failing.
                raise ValueError("blocks_to_swap works on transformer models (Flux, HunyuanVideo); "
                                 "set it to 0 for SD1.5 / SDXL")
            units = transformer_blocks(model)
            if blocks_to_swap > len(units):
                log.warning("Dojo: blocks_to_swap %d is more than the model's %d blocks; swapping all of them",
                            blocks_to_swap, len(units))
            if not checkpointing:
                log.warning("Dojo: block swap without gradient checkpointing keeps every block's weights "
                            "on the device until backward reaches it; turn checkpointing on to save memory")
            stack.enter_context(block_swap(units, device, resident=max(0, len(units) - blocks_to_swap)))
        yield stats


@contextlib.contextmanager
def protected_comfy_training(model, checkpointing: bool):
    """Forward/backward through a ComfyUI Flux or HunyuanVideo model with correct gradients; see
    `training.grad_safety.protected_training`. Nothing stays installed after exit."""
    with protected_training(transformer_blocks(model), checkpointing, rope_substitutions()) as stats:
        yield stats
