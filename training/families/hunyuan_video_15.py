"""HunyuanVideo 1.5 (ComfyUI's HunyuanVideo15 config): HunyuanVideo's network class with 32-channel latents
from a 16x spatial / 4x temporal VAE, patch size 1, a Qwen2.5-VL context plus byT5 glyph tokens
(`conditioning_byt5small`, which Encode Dataset keeps as an extra), no pooled vector, and an
image-conditioning input that ComfyUI fills with zeros for text-to-video (concat_cond).

HunyuanVideo's pieces apply: the same Flux-style blocks (in-place residual adds), targets and file layout
(`diffusion_model.<Tencent path>.lora_A/B`, which ComfyUI's HunyuanVideo key map reads for its 1.5 subclass
too). diffusers 0.42 has no LoRA loader for HunyuanVideo15Pipeline, so there is no diffusers format to match."""
from __future__ import annotations

from ..protocol import Family, TargetPreset
from ..recipes import LoraRecipe
from . import FamilySpec, FileMetadata, register
from .flux import FLUX_BLOCKS, FLUX_TARGETS
from .hunyuan_video import SPEC as HUNYUAN_VIDEO

SPEC = register(FamilySpec(
    family=Family.HUNYUAN_VIDEO_15,
    label="HunyuanVideo 1.5",
    comfy_configs=("HunyuanVideo15",),
    # HunyuanVideo's recipe (musubi-tuner: every block linear, rank 32, 2e-4).
    recipe=LoraRecipe(32, 2e-4, TargetPreset.ALL_LINEAR, True),
    targets=FLUX_TARGETS,
    lora_layout=HUNYUAN_VIDEO.lora_layout,
    metadata=FileMetadata(base_model_version="hunyuan_video_1_5", architecture="hunyuan-video-1.5",
                          implementation="https://github.com/Tencent-Hunyuan/HunyuanVideo-1.5",
                          default_resolution=(1280, 720), diffusers_pipeline="HunyuanVideo15Pipeline"),
    block_lists=FLUX_BLOCKS,
    writes_in_place="streams",   # Flux layers: `img += ...` into the block inputs only
    video=True,
    frames_rule="4k+1",
    vae_time_scale=4,
    vae_scale=16,
    # Not guidance-distilled: ComfyUI's extra_conds passes its own guidance, which the network ignores
    # without a guidance embedding.
    sample_cfg=6.0,
))
