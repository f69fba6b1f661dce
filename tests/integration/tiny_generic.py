"""Tiny random-weight stand-ins for issue 18's families: SD3.5-style MMDiT and LTX-Video (no first-class
support: they train in generic mode), Chroma and HunyuanVideo 1.5. Each is a diffusion-model file that
ComfyUI's own UNETLoader detects as the real family (`comfy.sd.load_diffusion_model`), built with
ComfyUI's own classes and cached like tiny_files' files (this module is part of the cache key).

Import only after the `comfy` fixture has booted ComfyUI.
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import torch

import tiny_comfy_models
import tiny_files

BUILDER_MODULES = tiny_files.BUILDER_MODULES + (Path(__file__),)

# SD3.5 MMDiT: detection reads depth from the patch embedding's width (hidden = 64 * depth, one head of
# 64 per block), RMS q/k norms as SD3.5 Large has them, and x-block self-attention in block 0 as SD3.5
# Medium has it. Context 4096 and pooled 2048 as SD3's text encoders give them.
SD3_TINY = dict(
    in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=2048, input_size=None,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    pos_embed_max_size=16, num_patches=256, qk_norm="rms", x_block_self_attn_layers=[0],
    pos_embed_scaling_factor=None,
)
# LTX-Video: detection fixes 32 heads and reads the head width from attn2.to_k; text width 4096 (T5-XXL).
LTXV_TINY = dict(image_model="ltxv", num_layers=2, attention_head_dim=4, cross_attention_dim=128,
                 in_channels=128, caption_channels=4096)
# HunyuanVideo 1.5 (the T2V transformer): HunyuanVideo's network with 32-channel latents (65 input channels:
# noise, the image-conditioning latent and its mask), patch 1, a Qwen2.5-VL context (3584) and the byT5
# glyph mapper, no pooled vector, no guidance embedding, and the 1.5 modules (vision_in of SigLIP width
# 1152, which detection requires, cond-type embedding). Detection reads 128-wide heads: hidden 256 = 2.
# The real model has no single-stream blocks (54 double); one here gives the last double block's text
# stream a use, so that every adapted layer gets a gradient in the gradient checks.
HUNYUAN_VIDEO_15_TINY = dict(
    image_model="hunyuan_video", in_channels=65, out_channels=32, patch_size=[1, 1, 1], vec_in_dim=None,
    axes_dim=[16, 56, 56], meanflow=False, context_in_dim=3584, hidden_size=256, mlp_ratio=4.0, num_heads=2,
    depth=2, depth_single_blocks=1, theta=256, qkv_bias=True, byt5=True, guidance_embed=False,
    use_cond_type_embedding=True, vision_in_dim=1152, meanflow_sum=True,
)
# Chroma's detection pins its modulation approximator (64 -> 5120 x 5 layers -> 3072), so the smallest
# detectable Chroma is Flux-sized (hidden 3072, ~0.8 G params with one block of each kind): routine tests
# build ComfyUI's Chroma in process with this config instead, and detection is checked on the meta device.
CHROMA_TINY = dict(
    image_model="chroma", in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=64, mlp_ratio=4.0,
    num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 14, 14], theta=10000, patch_size=2, qkv_bias=True,
    in_dim=64, out_dim=64, hidden_dim=128, n_layers=2, txt_ids_dims=[], vec_in_dim=None,
)
SD3_UNET = ("diffusion_models", "tiny_sd3_mmdit.safetensors")
LTXV_UNET = ("diffusion_models", "tiny_ltxv.safetensors")
HUNYUAN_VIDEO_15_UNET = ("diffusion_models", "tiny_hunyuan_video_15.safetensors")

# (latent shape of one sample, text width, pooled width or None) that each stand-in trains on.
GENERIC_SHAPES = {
    "sd3": ((16, 16, 16), 4096, 2048),
    "ltxv": ((128, 2, 4, 4), 4096, None),
    "hunyuan_video_15": ((32, 2, 4, 4), 3584, None),
    "chroma": ((16, 8, 8), 4096, None),
}


def _diffusion_model(config_name: str, unet_config: dict, seed: int, buffers: tuple[str, ...] = ()) -> torch.nn.Module:
    """The diffusion network ComfyUI's loader would build for `unet_config` (the config's own get_model),
    with random weights; `buffers` names saved buffers the model leaves uninitialised (they get small
    random values too)."""
    import comfy.supported_models
    config = getattr(comfy.supported_models, config_name)(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    net = model.diffusion_model
    tiny_comfy_models.randomize_(net, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in buffers:
            buffer = net.get_buffer(name)
            buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.02)
    return net


def _known_kwargs(fn, config: dict) -> dict:
    """The keys of `config` that `fn` takes (older ComfyUI versions have fewer options)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(config)
    return {k: v for k, v in config.items() if k in params}


def write_tiny_sd3(path: Path, seed: int = 21) -> Path:
    """An SD3.5-style MMDiT (2 joint blocks, hidden 128, ~1.3 M params) that UNETLoader detects as SD3."""
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    net = _diffusion_model("SD3", _known_kwargs(MMDiT.__init__, SD3_TINY), seed, buffers=("pos_embed",))
    return tiny_files._save(net.state_dict(), path)


def write_tiny_ltxv(path: Path, seed: int = 22) -> Path:
    """An LTX-Video transformer (2 blocks, 32 heads of 4, ~1.2 M params) that UNETLoader detects as LTXV."""
    net = _diffusion_model("LTXV", LTXV_TINY, seed)
    return tiny_files._save(net.state_dict(), path)


def _hunyuan_config(config: dict) -> dict:
    import comfy.ldm.hunyuan_video.model as hv
    import dataclasses
    known = {f.name for f in dataclasses.fields(hv.HunyuanVideoParams)} | {"image_model"}
    return {k: v for k, v in config.items() if k in known}


def write_tiny_hunyuan_video_15(path: Path, seed: int = 23) -> Path:
    """A HunyuanVideo 1.5 transformer (2 double blocks + 1 single, hidden 256, ~18 M params, most of it the byT5 mapper
    and the 3584-wide text input) that UNETLoader detects as HunyuanVideo15."""
    net = _diffusion_model("HunyuanVideo15", _hunyuan_config(HUNYUAN_VIDEO_15_TINY), seed)
    return tiny_files._save(net.state_dict(), path)


def build_tiny_chroma(seed: int = 24, **overrides):
    """ComfyUI's Chroma (comfy.model_base.Chroma, config comfy.supported_models.Chroma) with a tiny config
    (hidden 64, 2 double + 2 single blocks, T5-wide context), in a ModelPatcher; built in process."""
    import comfy.supported_models
    from inprocess_models import patcher_for
    return patcher_for(comfy.supported_models.Chroma(dict(CHROMA_TINY, **overrides)), seed)


# ComfyUI's Chroma always computes the real model's 344 modulation vectors (3 per single block, 12 per double
# block, 2 final) and takes the final layer's from the end; diffusers computes as many as the configured
# blocks need, and its kohya converter knows at most 19 double and 38 single blocks. Both hold only at the
# real block counts (at hidden 64: ~4 M params).
CHROMA_REAL_DEPTHS = dict(depth=19, depth_single_blocks=38)


def detectable_chroma_config_name() -> str:
    """The ComfyUI config that detection picks for a full-width Chroma state dict (hidden 3072, one double and
    one single block, the pinned approximator), built on the meta device: no weights are made or written."""
    import comfy.ldm.chroma.model as chroma
    import comfy.model_detection
    import comfy.ops
    config = dict(CHROMA_TINY, hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], depth=1, depth_single_blocks=1,
                  out_dim=3072, hidden_dim=5120, n_layers=5)
    config.pop("image_model")
    known = {f.name for f in dataclasses.fields(chroma.ChromaParams)}
    net = chroma.Chroma(**{k: v for k, v in config.items() if k in known}, device="meta",
                        operations=comfy.ops.disable_weight_init)
    state = net.state_dict()
    unet_config = comfy.model_detection.detect_unet_config(state, "")
    found = comfy.model_detection.model_config_from_unet_config(unet_config, state)
    return type(found).__name__ if found is not None else ""


def provide_tiny_hunyuan_video_15(base: Path) -> str:
    return tiny_files.provide(base, HUNYUAN_VIDEO_15_UNET, write_tiny_hunyuan_video_15, BUILDER_MODULES)


def provide_tiny_sd3(base: Path) -> str:
    return tiny_files.provide(base, SD3_UNET, write_tiny_sd3, BUILDER_MODULES)


def provide_tiny_ltxv(base: Path) -> str:
    return tiny_files.provide(base, LTXV_UNET, write_tiny_ltxv, BUILDER_MODULES)


def load_unet(base: Path, name: str):
    """What UNETLoader returns for models/diffusion_models/<name> (a fresh ModelPatcher)."""
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(base / "models" / "diffusion_models" / name))

