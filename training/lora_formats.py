"""LoRA file layouts that ComfyUI, diffusers and A1111 read (DESIGN.md section 4).

Alpha/rank is baked into the up matrix, so every loader applies the same delta: up @ down. kohya-style
files (`lora_unet_*`, `lora_te*_*`) also carry `<module>.alpha` = rank, which every loader reads as a
scale of 1: kohya's Flux loader (`networks/lora_flux.py`) requires one per module, and ComfyUI and
diffusers read alpha = rank exactly as no alpha. The musubi/diffusers `lora_A/B` layout (HunyuanVideo)
has no alpha key. Module names come in the model's native (ComfyUI / original) layout; SD UNets
additionally need the diffusers name of each module, which the caller supplies (ComfyUI knows it).
"""
from __future__ import annotations

import re

import torch

from .protocol import Family

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]

# ComfyUI's HunyuanVideo module names -> the original Tencent names diffusers' converter expects.
_HUNYUAN_RENAMES = [
    (r"(img|txt)_attn\.qkv$", r"\1_attn_qkv"),
    (r"(img|txt)_attn\.proj$", r"\1_attn_proj"),
    (r"(img|txt)_mlp\.0$", r"\1_mlp.fc1"),
    (r"(img|txt)_mlp\.2$", r"\1_mlp.fc2"),
    (r"(img|txt)_mod\.lin$", r"\1_mod.linear"),
    (r"modulation\.lin$", r"modulation.linear"),
]


def kohya_keys(factors: Factors, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """`<prefix><module path with . -> _>.lora_down/.lora_up.weight` and `.alpha` (= rank)."""
    out = {}
    for name, (down, up) in factors.items():
        key = prefix + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def hunyuan_video_name(comfy_name: str) -> str:
    for pattern, repl in _HUNYUAN_RENAMES:
        comfy_name = re.sub(pattern, repl, comfy_name)
    return comfy_name


def lora_state_dict(family: Family, factors: Factors, diffusers_names: dict[str, str] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The file's tensors for `family` from per-module (down, up) factors keyed by native module name."""
    family = Family(family)
    if family in (Family.SD15, Family.SDXL):
        if diffusers_names is None:
            raise ValueError("SD UNet LoRAs need the diffusers name of each module")
        missing = [n for n in factors if n not in diffusers_names]
        if missing:
            raise ValueError(f"no diffusers name known for {len(missing)} modules, e.g. {missing[:3]}")
        return kohya_keys({diffusers_names[n]: f for n, f in factors.items()})
    if family is Family.FLUX:
        return kohya_keys(factors)
    out = {}
    for name, (down, up) in factors.items():
        key = f"diffusion_model.{hunyuan_video_name(name)}"
        out[f"{key}.lora_A.weight"] = down
        out[f"{key}.lora_B.weight"] = up
    return out


def factors_from_state_dict(family: Family, state: dict[str, torch.Tensor], module_names: list[str],
                            diffusers_names: dict[str, str] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of `lora_state_dict` for the modules in `module_names`: (down, up) per module found in
    a file. Keys that belong to none of those modules are reported, never silently dropped."""
    if Family(family) in (Family.SD15, Family.SDXL) and diffusers_names is None:
        raise ValueError("SD UNet LoRAs need the diffusers name of each module")
    return factors_from_keys(state, {name: _module_keys(family, name, diffusers_names) for name in module_names})


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


def _module_keys(family: Family, name: str, diffusers_names: dict[str, str] | None) -> list[str]:
    """The (down, up, alpha) keys of module `name` in `family`'s layout."""
    family = Family(family)
    if family is Family.HUNYUAN_VIDEO:
        key = f"diffusion_model.{hunyuan_video_name(name)}"
        return [f"{key}.lora_A.weight", f"{key}.lora_B.weight", f"{key}.alpha"]
    path = diffusers_names[name] if family in (Family.SD15, Family.SDXL) else name
    key = "lora_unet_" + path.replace(".", "_")
    return [f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"]
