"""Stable Diffusion 1.x (ComfyUI's SD15 config): an eps UNet, kohya `lora_unet_` files in diffusers names."""
from __future__ import annotations

from ..protocol import Family, TargetPreset
from ..recipes import LoraRecipe
from . import FamilySpec, FileMetadata, LoraLayout, register

# Over ComfyUI's UNet module names (openaimodel: transformer blocks' attn1 / attn2 / ff).
UNET_TARGETS = {
    TargetPreset.ATTENTION: r"attn[12]\.to_",
    TargetPreset.ATTENTION_MLP: r"attn[12]\.to_|\.ff\.net\.",
    TargetPreset.ALL_LINEAR: r".",
}
UNET_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
# kohya's layout over the diffusers module names ComfyUI's key map gives (what A1111 and diffusers read).
UNET_LAYOUT = LoraLayout(needs_diffusers_names=True)

SPEC = register(FamilySpec(
    family=Family.SD15,
    label="SD1.5",
    comfy_configs=("SD15",),
    recipe=LoraRecipe(16, 1e-4, TargetPreset.ATTENTION_MLP, False),
    targets=UNET_TARGETS,
    lora_layout=UNET_LAYOUT,
    metadata=FileMetadata(base_model_version="sd_v1", architecture="stable-diffusion-v1", implementation="diffusers",
                          default_resolution=(512, 512), records_prediction=True,
                          hub_base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                          diffusers_pipeline="StableDiffusionPipeline"),
    unet_blocks=UNET_BLOCKS,
    sample_cfg=7.0,
    text_encoders=("clip_l",),
    te_lora_prefixes={"clip_l": "lora_te_"},
))
