"""Tiny random-weight stand-ins for issue 18's families: SD3.5-style MMDiT and LTX-Video (no first-class
support: they train in generic mode), Chroma and HunyuanVideo 1.5. Each is a diffusion-model file that
ComfyUI's own UNETLoader detects as the real family (`comfy.sd.load_diffusion_model`), built with
ComfyUI's own classes and cached like tiny_files' files (this module is part of the cache key).

Import only after the `comfy` fixture has booted ComfyUI.
"""
from __future__ import annotations

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
SD3_UNET = ("diffusion_models", "tiny_sd3_mmdit.safetensors")
LTXV_UNET = ("diffusion_models", "tiny_ltxv.safetensors")

# (latent shape of one sample, text width, pooled width or None) that each stand-in trains on.
GENERIC_SHAPES = {
    "sd3": ((16, 16, 16), 4096, 2048),
    "ltxv": ((128, 2, 4, 4), 4096, None),
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


def provide_tiny_sd3(base: Path) -> str:
    return tiny_files.provide(base, SD3_UNET, write_tiny_sd3, BUILDER_MODULES)


def provide_tiny_ltxv(base: Path) -> str:
    return tiny_files.provide(base, LTXV_UNET, write_tiny_ltxv, BUILDER_MODULES)


def load_unet(base: Path, name: str):
    """What UNETLoader returns for models/diffusion_models/<name> (a fresh ModelPatcher)."""
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(base / "models" / "diffusion_models" / name))

