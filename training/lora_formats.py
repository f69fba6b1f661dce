"""LoRA file layouts that ComfyUI, diffusers and A1111 read (DESIGN.md section 4).

Alpha/rank is baked into the up matrix, so every loader applies the same delta: up @ down. kohya-style
files (`lora_unet_*`, `lora_te*_*`) also carry `<module>.alpha` = rank, which every loader reads as a
scale of 1: kohya's Flux loader (`networks/lora_flux.py`) requires one per module, and ComfyUI and
diffusers read alpha = rank exactly as no alpha. The musubi/diffusers `lora_A/B` layout (HunyuanVideo)
has no alpha key. Module names come in the model's native (ComfyUI / original) layout; SD UNets
additionally need the diffusers name of each module, which the caller supplies (ComfyUI knows it).
Each family's layout is its spec's `lora_layout` (training/families); these are the helpers over it.
"""
from __future__ import annotations

import torch

from .families import FamilyLike, LoraLayout, as_spec

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def kohya_keys(factors: Factors, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """`<prefix><module path with . -> _>.lora_down/.lora_up.weight` and `.alpha` (= rank)."""
    return LoraLayout(prefix=prefix).state_dict(factors)


def lora_state_dict(family: FamilyLike, factors: Factors, diffusers_names: dict[str, str] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The file's tensors in the family's layout from per-module (down, up) factors keyed by native module name."""
    return as_spec(family).lora_layout.state_dict(factors, diffusers_names)


def factors_from_state_dict(family: FamilyLike, state: dict[str, torch.Tensor], module_names: list[str],
                            diffusers_names: dict[str, str] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of `lora_state_dict` for the modules in `module_names`: (down, up) per module found in
    a file. Keys that belong to none of those modules are reported, never silently dropped."""
    layout = as_spec(family).lora_layout
    if layout.needs_diffusers_names and diffusers_names is None:
        raise ValueError("SD UNet LoRAs need the diffusers name of each module")
    state = layout.join_fused(state, module_names, diffusers_names)
    return factors_from_keys(state, {name: list(layout.keys(name, diffusers_names)) for name in module_names})


def factors_from_keys(state: dict[str, torch.Tensor], keys_by_module: dict[str, list[str]]
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) per module from a file's tensors, given each module's (down, up, alpha) keys; an alpha
    other than the rank is folded into up. Every tensor must belong to one of the modules."""
    by_key = {key: (name, slot) for name, keys in keys_by_module.items() for slot, key in enumerate(keys)}
    unknown = sorted(k for k in state if k not in by_key)
    if unknown:
        raise ValueError(f"{len(unknown)} tensors of the LoRA belong to no layer of the chosen targets "
                         f"(e.g. {unknown[:2]}); it may be for another family or target preset")
    pairs: dict[str, list] = {}
    for key, tensor in state.items():
        name, slot = by_key[key]
        pairs.setdefault(name, [None, None, None])[slot] = tensor.float()
    missing = [n for n, (d, u, _) in pairs.items() if d is None or u is None]
    if missing:
        raise ValueError(f"the LoRA lacks the down or up half of {len(missing)} layers (e.g. {missing[:2]})")
    # A file from another trainer may hold alpha != rank: fold its scale into up, as Dojo's own files have it.
    return {n: (d, u if a is None else u * (a.item() / d.shape[0])) for n, (d, u, a) in pairs.items()}


def check_lora_tensors(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a LoRA whose tensors are not floating point or hold NaN / Inf, naming the first such tensor:
    applied, it would silently give black images (NaN) or nonsense (a bool or integer "weight")."""
    for key, tensor in tensors.items():
        if not torch.is_tensor(tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(f"{source}: tensor '{key}' is {kind}, not floating point, so it is not LoRA weights; "
                             "use a LoRA file made by a trainer (or re-save it as fp16 / fp32)")
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(f"{source}: tensor '{key}' holds {bad} NaN or infinite values of {tensor.numel()}; the "
                             "LoRA is broken (a diverged training run?) and would spoil every image: retrain it or "
                             "use an earlier file")
