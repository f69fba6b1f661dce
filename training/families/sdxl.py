"""SDXL base (ComfyUI's SDXL config): the SD UNet layout and targets, two CLIPs, size conditioning."""
from __future__ import annotations

import torch

from ..protocol import Family, TargetPreset
from ..recipes import LoraRecipe
from . import FamilySpec, FileMetadata, register
from .sd15 import UNET_BLOCKS, UNET_LAYOUT, UNET_TARGETS

IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"


def size_conditions(noisy: torch.Tensor, extra: dict) -> dict:
    """SDXL conditions on the image size: a training batch is described as an uncropped image of exactly
    its own size (as kohya does for bucketed data), unless the encoded conditioning already says otherwise."""
    height, width = noisy.shape[-2] * 8, noisy.shape[-1] * 8
    sizes = {"width": width, "height": height, "target_width": width, "target_height": height,
             "crop_w": 0, "crop_h": 0}
    return {**sizes, **extra}


SPEC = register(FamilySpec(
    family=Family.SDXL,
    label="SDXL",
    # Refiners etc. are not listed: their conditioning differs and they are not supported.
    comfy_configs=("SDXL",),
    recipe=LoraRecipe(16, 1e-4, TargetPreset.ATTENTION_MLP, True),
    targets=UNET_TARGETS,
    lora_layout=UNET_LAYOUT,
    metadata=FileMetadata(base_model_version="sdxl_base_v1-0", architecture="stable-diffusion-xl-v1-base",
                          implementation=IMPL_STABILITY_AI, records_prediction=True,
                          hub_base_model="stabilityai/stable-diffusion-xl-base-1.0",
                          diffusers_pipeline="StableDiffusionXLPipeline"),
    unet_blocks=UNET_BLOCKS,
    extra_conditions=size_conditions,
    sample_cfg=7.0,
    text_encoders=("clip_l", "clip_g"),
    te_lora_prefixes={"clip_l": "lora_te1_", "clip_g": "lora_te2_"},
))
