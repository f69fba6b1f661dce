"""Chroma (ComfyUI's Chroma config, comfy/ldm/chroma): Flux's double- and single-stream blocks without their
modulation linears (one approximator network, `distilled_guidance_layer`, computes every block's modulation),
a T5-XXL context only (no pooled CLIP vector), and no guidance distillation: it samples with CFG.

Flux's pieces apply: the same block lists and target names, the same in-place residual adds, and the same
kohya file (`lora_unet_<BFL path>`, alpha = rank). ComfyUI's Chroma is a Flux subclass in its LoRA key map
(comfy/lora.py), and diffusers' ChromaPipeline reads LoRAs with FluxLoraLoaderMixin, whose kohya converter
maps the attention and MLP linears (the only linears in Chroma's blocks) onto ChromaTransformer2DModel."""
from __future__ import annotations

from ..protocol import Family, TargetPreset
from ..recipes import LoraRecipe
from . import KOHYA, FamilySpec, FileMetadata, register
from .flux import FLUX_BLOCKS, FLUX_TARGETS

SPEC = register(FamilySpec(
    family=Family.CHROMA,
    label="Chroma",
    comfy_configs=("Chroma",),   # ChromaRadiance (pixel space) is another network: generic mode
    recipe=LoraRecipe(16, 1e-4, TargetPreset.ATTENTION_MLP, True),
    targets=FLUX_TARGETS,
    lora_layout=KOHYA,
    metadata=FileMetadata(base_model_version="chroma", architecture="chroma",
                          implementation="https://huggingface.co/lodestones/Chroma",
                          network_module="networks.lora_flux", diffusers_pipeline="ChromaPipeline"),
    block_lists=FLUX_BLOCKS,
    writes_in_place="streams",   # Flux layers: `img += ...` into the block inputs only
    # ComfyUI's Chroma.extra_conds passes guidance 0, the value Chroma was trained with; nothing to add.
    sample_cfg=4.0,
))
