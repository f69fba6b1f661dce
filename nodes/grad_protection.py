"""ComfyUI side of the gradient protection (issue 11): which blocks of a ComfyUI diffusion model to
protect and checkpoint, and the ops to swap for differentiable ones while training."""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..training import families
from ..training.block_swap import block_swap
from ..training.families import FamilySpec
from ..training.grad_safety import protected_training
from . import comfy_compat as cc
from .comfy_compat import rope_substitutions


def diffusion_model_of(model) -> nn.Module:
    """The diffusion network of a ModelPatcher, a BaseModel, or the network itself."""
    model = getattr(model, "model", model)  # ModelPatcher -> BaseModel
    return getattr(model, "diffusion_model", model)


def spec_of(model, spec: FamilySpec | None = None) -> FamilySpec:
    """The family spec whose block layout `model` has: `spec` when the caller has it (the model view's
    own, which may be built at run time), else its ComfyUI config's family, else, for a bare network,
    the registered family whose block lists (or UNet block containers) it has."""
    if spec is not None:
        return spec
    base = getattr(model, "model", model)
    if getattr(base, "model_config", None) is not None:
        return cc.model_spec(model)  # its family's, or the generic spec built from it
    net = diffusion_model_of(model)
    for kind in ("block_lists", "unet_blocks"):
        for candidate in families.all_specs():
            names = getattr(candidate, kind)
            if names and all(getattr(net, name, None) is not None for name in names):
                return candidate
    raise ValueError(f"{type(net).__name__} has the blocks of no family Dojo knows ({families.labels()}); "
                     "cannot protect or checkpoint its gradients")


def _submodule(net: nn.Module, name: str):
    try:
        return net.get_submodule(name)
    except AttributeError:
        return None


def transformer_blocks(model, spec: FamilySpec | None = None) -> list[nn.Module]:
    """The transformer blocks of a ComfyUI model in call order (Flux: double-stream blocks first), from
    the spec's `block_lists`."""
    spec = spec_of(model, spec)
    net = diffusion_model_of(model)
    # Generic specs may name nested lists by dotted path (get_submodule); family lists may be absent (None).
    blocks = [b for name in spec.block_lists for b in _submodule(net, name) or ()]
    if not blocks:
        raise ValueError(f"{type(net).__name__} has none of {spec.block_lists}; cannot protect its gradients")
    return blocks


def checkpoint_units(model, spec: FamilySpec | None = None) -> list[nn.Module]:
    """The blocks whose activations gradient checkpointing recomputes: the transformer blocks, or the
    layers inside a UNet's input, middle and output blocks (ComfyUI's UNet calls those layers one by one
    and never the block containers, so wrapping the containers would do nothing)."""
    spec = spec_of(model, spec)
    net = diffusion_model_of(model)
    if spec.block_lists:
        return transformer_blocks(net, spec)
    units = []
    for name in spec.unet_blocks:
        part = getattr(net, name, None)
        blocks = list(part) if isinstance(part, nn.ModuleList) else [part] if isinstance(part, nn.Module) else []
        for block in blocks:
            units += list(block.children()) if isinstance(block, nn.Sequential) else [block]
    if not units:
        raise ValueError(f"{type(net).__name__} has no blocks Dojo knows how to checkpoint")
    return units


def needs_protection(model, spec: FamilySpec | None = None) -> bool | str:
    """Whether the model's blocks write in place into tensors autograd saved (the spec says): False,
    "streams" (only into their own inputs) or True (anywhere); grad_safety.protected_training's `protect`."""
    return spec_of(model, spec).writes_in_place


def supports_block_swap(model, spec: FamilySpec | None = None) -> bool:
    """Transformer blocks are called as modules, so per-block hooks can stream them; a UNet's are not."""
    return bool(spec_of(model, spec).block_lists)


log = logging.getLogger("comfyui-dojo")


@contextlib.contextmanager
def training_region(model, checkpointing: bool, blocks_to_swap: int = 0,
                    device: torch.device | str = "cpu", spec: FamilySpec | None = None):
    """Where a training step's forward and backward run: ComfyUI's own training flag where it has one
    (0.33: its models then use differentiable RoPE; on 0.8 Dojo substitutes comfy-kitchen's op),
    copy-on-write protection for models that write in place into saved tensors (also around their
    checkpoint recomputation), block checkpointing when asked, and with `blocks_to_swap` > 0 the last
    that many blocks streamed to `device` from the CPU for each forward (training.block_swap). `spec`:
    the model view's family spec (else found from the model)."""
    spec = spec_of(model, spec)
    with contextlib.ExitStack() as stack:
        stats = None
        stack.enter_context(cc.comfy_training_mode())
        protect = needs_protection(model, spec)
        # Transformers need the substitutions whenever ComfyUI would call an op without a backward (0.8's
        # RoPE), also when they neither write in place nor checkpoint (Wan with checkpointing off); UNets
        # call no RoPE and keep their steps free of the substitution's per-op dispatch.
        substitutions = cc.training_substitutions() if spec.block_lists else {}
        if checkpointing or protect or substitutions:
            stats = stack.enter_context(
                protected_training(checkpoint_units(model, spec), checkpointing, substitutions, protect))
        if blocks_to_swap > 0:
            if not supports_block_swap(model, spec):
                # A UNet's input/output blocks are not called as modules (ComfyUI's forward_timestep_embed
                # iterates their layers), so per-block hooks would never run: refuse instead of failing.
                raise ValueError(f"blocks_to_swap works on transformer models, not on a {spec.label} UNet; "
                                 "set it to 0")
            units = transformer_blocks(model, spec)
            if blocks_to_swap > len(units):
                log.warning("Dojo: blocks_to_swap %d is more than the model's %d blocks; swapping all of them",
                            blocks_to_swap, len(units))
            if not checkpointing:
                log.warning("Dojo: block swap without gradient checkpointing keeps every block's weights "
                            "on the device until backward reaches it; turn checkpointing on to save memory")
            stack.enter_context(block_swap(units, device, resident=max(0, len(units) - blocks_to_swap)))
        yield stats


@contextlib.contextmanager
def protected_comfy_training(model, checkpointing: bool, spec: FamilySpec | None = None, protect=None):
    """Forward/backward through a ComfyUI transformer model (Flux, HunyuanVideo, ...) with correct
    gradients; see `training.grad_safety.protected_training` (`protect`: its protection, by default
    the family's, copy-on-write where the family does not say). Nothing stays installed after exit."""
    if protect is None:
        protect = needs_protection(model, spec) or True
    with protected_training(transformer_blocks(model, spec), checkpointing, rope_substitutions(), protect) as stats:
        yield stats
