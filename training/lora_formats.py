"""LoRA file layouts that ComfyUI, diffusers and A1111 read (DESIGN.md section 4).

Alpha/rank is baked into the up matrix and no `.alpha` key is written, so every loader applies the
same delta: up @ down.
"""
from __future__ import annotations

import torch


def kohya_unet_keys(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """`lora_unet_<diffusers module path with . -> _>.lora_down/.lora_up.weight` (SD1.5 / SDXL UNets)."""
    out = {}
    for name, (down, up) in factors.items():
        key = prefix + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
    return out
