"""Qwen-Image (ComfyUI's QwenImage config, comfy/ldm/qwen_image): a double-stream flow transformer of
`transformer_blocks` over Qwen2.5-VL text, on 16-channel latents of Wan 2.1's VAE, which carry a time
axis even for images ([C, 1, H, W]).

The blocks are out of place (`torch.addcmul` / `x + gate * y` residuals; the in-place `+=` in the forward is
the ControlNet path only), so they need no copy-on-write protection; the float64 gradient test checks that.
The text-to-image model needs no extra conditions beyond ComfyUI's own: the text encoder's attention mask
(when a prompt has padding) goes through QwenImage's `extra_conds`; reference latents are for the Edit models.

LoRA files: ComfyUI's Qwen-Image modules carry the diffusers names, and musubi-tuner's `networks.lora_qwen_image`
writes kohya keys over them (`lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight` + `.alpha`), which
ComfyUI's LoraLoader and diffusers' Qwen-Image converter both read: Dojo writes that layout.
"""
from __future__ import annotations

from ..protocol import Family, TargetPreset
from ..recipes import LoraRecipe
from . import KOHYA, FamilySpec, FileMetadata, register

QWEN_IMAGE_BLOCKS = ("transformer_blocks",)

_BLOCK = r"transformer_blocks\.\d+\."
_ATTENTION = r"attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)$"
QWEN_IMAGE_TARGETS = {
    TargetPreset.ATTENTION: _BLOCK + _ATTENTION,
    TargetPreset.ATTENTION_MLP: _BLOCK + r"(" + _ATTENTION + r"|(img|txt)_mlp\.net\.(0\.proj|2)$)",
    TargetPreset.ALL_LINEAR: _BLOCK,   # adds img_mod / txt_mod
}

SPEC = register(FamilySpec(
    family=Family.QWEN_IMAGE,
    label="Qwen-Image",
    comfy_configs=("QwenImage",),
    # musubi-tuner's documented Qwen-Image LoRA: network_dim 16, lr 5e-5, gradient checkpointing (20 B).
    recipe=LoraRecipe(16, 5e-5, TargetPreset.ATTENTION_MLP, True),
    targets=QWEN_IMAGE_TARGETS,
    lora_layout=KOHYA,
    metadata=FileMetadata(base_model_version="qwen_image", architecture="qwen-image",
                          implementation="https://github.com/QwenLM/Qwen-Image",
                          network_module="networks.lora_qwen_image",
                          hub_base_model="Qwen/Qwen-Image", diffusers_pipeline="QwenImagePipeline",
                          default_resolution=(1328, 1328)),
    block_lists=QWEN_IMAGE_BLOCKS,
    writes_in_place=False,
    sample_cfg=2.5,   # Qwen-Image is not guidance-distilled: ComfyUI's template samples at CFG 2.5
))
