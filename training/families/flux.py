"""Flux.1 dev / schnell (ComfyUI's Flux, FluxSchnell configs): a guidance-distilled flow transformer whose
double- and single-stream blocks add residuals in place (comfy/ldm/flux/layers.py)."""
from __future__ import annotations

from ..protocol import Family, TargetPreset
from ..recipes import LoraRecipe
from . import KOHYA, FamilySpec, FileMetadata, register, training_guidance

# Over ComfyUI's Flux module names; HunyuanVideo's blocks are the same classes.
FLUX_TARGETS = {
    TargetPreset.ATTENTION: r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12]",
    TargetPreset.ATTENTION_MLP: r"double_blocks\.\d+\.((img|txt)_attn\.(qkv|proj)|(img|txt)_mlp\.[02])"
                                r"|single_blocks\.\d+\.linear[12]",
    TargetPreset.ALL_LINEAR: r"(double|single)_blocks\.\d+\.",
}
FLUX_BLOCKS = ("double_blocks", "single_blocks")

SPEC = register(FamilySpec(
    family=Family.FLUX,
    label="Flux",
    comfy_configs=("Flux", "FluxSchnell"),
    recipe=LoraRecipe(16, 1e-4, TargetPreset.ATTENTION_MLP, True),
    targets=FLUX_TARGETS,
    lora_layout=KOHYA,   # kohya's Flux loader (networks/lora_flux.py) wants ComfyUI's own names, with alpha
    metadata=FileMetadata(base_model_version="flux1", architecture="flux-1-dev",
                          implementation="https://github.com/black-forest-labs/flux",
                          network_module="networks.lora_flux",
                          hub_base_model="black-forest-labs/FLUX.1-dev", diffusers_pipeline="FluxPipeline"),
    block_lists=FLUX_BLOCKS,
    writes_in_place="streams",   # Flux layers: `img += ...` into the block inputs only
    extra_conditions=training_guidance,
    sample_cfg=1.0,
    te_lora_prefixes={"clip_l": "lora_te1_"},
))
