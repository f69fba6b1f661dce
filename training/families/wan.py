"""Wan: Wan 2.1 T2V (1.3B, 14B), Wan 2.2 A14B's two experts, and Wan 2.2 TI2V 5B (issue 18).

ComfyUI detects the T2V networks as `WAN21_T2V` (dim 1536 / 5120, 16 latent channels) and the 5B as
`WAN22_T2V` (48 channels, `model_base.WAN22`, the Wan 2.2 VAE's 16x spatial / 4x temporal latents).
Wan 2.2 A14B ships two WAN21_T2V networks, a high-noise and a low-noise expert: each trains its own LoRA
on its share of the noise levels (Train LoRA's timestep_min / timestep_max; the anchors' T2V boundary is
t = 0.875: high-noise t >= 0.875, low-noise t < 0.875).

Recipe (the anchors' Wan defaults): musubi-tuner `networks.lora_wan`, `--network_dim 32`,
`--learning_rate 2e-4`, `--timestep_sampling shift --discrete_flow_shift 3.0`, gradient checkpointing;
ai-toolkit's Wan 2.1 / 2.2 configs: linear 32, lr 1e-4. Targets: every linear of each `blocks.N`
(self-attention q/k/v/o, cross-attention q/k/v/o, ffn.0 / ffn.2), what `networks.lora_wan` adapts.
Wan samples with ComfyUI's flow shift 8; training uses musubi's 3.0 (inference's shift pushes training
far into the noisiest steps).

Blocks (comfy/ldm/wan/model.py WanAttentionBlock, ComfyUI 0.8 and 0.33) add their residuals out of place
(torch.addcmul, x + ...), so no in-place protection is needed; RoPE goes through comfy-kitchen unless
ComfyUI's `in_training` flag is set (the pack's RoPE substitution handles it as for Flux).

File layout: `diffusion_model.blocks.N.<module>.lora_A.weight` / `.lora_B.weight`, alpha folded into B,
no alpha key. ComfyUI reads it (its generic `diffusion_model.<module>` key map; ComfyUI has no
Wan-specific names), diffusers 0.42 converts it (`_convert_non_diffusers_wan_lora_to_diffusers`, which
takes any subset of a block's linears), and it is the layout musubi-tuner's `convert_lora.py` writes
for ComfyUI ("other" format). musubi's native kohya-style `lora_unet_blocks_N_...` also loads in ComfyUI,
but diffusers' musubi converter demands every self-/cross-attention and ffn linear of every block with an
alpha each, so an attention-only LoRA would not load there.
"""
from __future__ import annotations

from dataclasses import replace

from ..protocol import Family, TargetPreset
from ..recipes import LoraRecipe
from . import FamilySpec, FileMetadata, LoraLayout, register

ATTENTION = r"^blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)$"
TARGETS = {
    TargetPreset.ATTENTION: ATTENTION,
    TargetPreset.ATTENTION_MLP: r"^blocks\.\d+\.((self_attn|cross_attn)\.(q|k|v|o)|ffn\.[02])$",
    TargetPreset.ALL_LINEAR: r"^blocks\.\d+\.",
}

# ComfyUI / diffusers / musubi-tuner ("other" format) Wan LoRA layout.
WAN_LAYOUT = LoraLayout(prefix="diffusion_model.", down=".lora_A.weight", up=".lora_B.weight", alpha=False,
                        underscores=False)

# musubi-tuner's training shift for Wan (inference samples at 8; see the module docstring).
TRAIN_SHIFT = 3.0

WAN21 = register(FamilySpec(
    family=Family.WAN21,
    label="Wan 2.1",
    comfy_configs=("WAN21_T2V",),
    recipe=LoraRecipe(32, 2e-4, TargetPreset.ATTENTION_MLP, True, shift=TRAIN_SHIFT),
    targets=TARGETS,
    lora_layout=WAN_LAYOUT,
    metadata=FileMetadata(base_model_version="wan", architecture="wan2.1-t2v",
                          implementation="https://github.com/Wan-Video/Wan2.1",
                          network_module="networks.lora_wan", default_resolution=(832, 480),
                          hub_base_model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", diffusers_pipeline="WanPipeline"),
    block_lists=("blocks",),
    writes_in_place=False,
    video=True,
    frames_rule="4k+1",
    vae_time_scale=4,
    vae_scale=8,
    sample_cfg=5.0,
))

# The 5B: the same blocks and file layout over the Wan 2.2 VAE's 48-channel, 16x latents.
WAN22_5B = register(replace(
    WAN21,
    family=Family.WAN22_5B,
    label="Wan 2.2 5B",
    comfy_configs=("WAN22_T2V",),
    recipe=LoraRecipe(32, 1e-4, TargetPreset.ATTENTION_MLP, True, shift=TRAIN_SHIFT),
    metadata=replace(WAN21.metadata, architecture="wan2.2-ti2v-5b", implementation="https://github.com/Wan-Video/Wan2.2",
                     default_resolution=(1280, 704), hub_base_model="Wan-AI/Wan2.2-TI2V-5B-Diffusers"),
    vae_scale=16,
))
