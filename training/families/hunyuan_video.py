"""HunyuanVideo (ComfyUI's HunyuanVideo config): Flux's block classes over video latents [C, T, H, W] from
a causal VAE (4k+1 frames), musubi / diffusers `lora_A` / `lora_B` files in the original Tencent names."""
from __future__ import annotations

from ..protocol import Family, TargetPreset
from ..recipes import LoraRecipe
from . import FamilySpec, FileMetadata, LoraLayout, register, renamer, training_guidance
from .flux import FLUX_BLOCKS, FLUX_TARGETS

# ComfyUI's HunyuanVideo module names -> the original Tencent names diffusers' converter expects.
TENCENT_NAMES = renamer([
    (r"(img|txt)_attn\.qkv$", r"\1_attn_qkv"),
    (r"(img|txt)_attn\.proj$", r"\1_attn_proj"),
    (r"(img|txt)_mlp\.0$", r"\1_mlp.fc1"),
    (r"(img|txt)_mlp\.2$", r"\1_mlp.fc2"),
    (r"(img|txt)_mod\.lin$", r"\1_mod.linear"),
    (r"modulation\.lin$", r"modulation.linear"),
])

SPEC = register(FamilySpec(
    family=Family.HUNYUAN_VIDEO,
    label="HunyuanVideo",
    comfy_configs=("HunyuanVideo",),
    # musubi-tuner's HunyuanVideo default: every linear of the double- and single-stream blocks.
    recipe=LoraRecipe(32, 2e-4, TargetPreset.ALL_LINEAR, True),
    targets=FLUX_TARGETS,
    lora_layout=LoraLayout(prefix="diffusion_model.", down=".lora_A.weight", up=".lora_B.weight", alpha=False,
                           underscores=False, rename=TENCENT_NAMES),
    metadata=FileMetadata(base_model_version="hunyuan_video", architecture="hunyuan-video",
                          implementation="https://github.com/Tencent/HunyuanVideo", default_resolution=(1280, 720),
                          hub_base_model="hunyuanvideo-community/HunyuanVideo",
                          diffusers_pipeline="HunyuanVideoPipeline"),
    block_lists=FLUX_BLOCKS,
    writes_in_place="streams",   # Flux layers: `img += ...` into the block inputs only
    video=True,
    frames_rule="4k+1",
    vae_time_scale=4,
    extra_conditions=training_guidance,
    sample_cfg=1.0,
))
