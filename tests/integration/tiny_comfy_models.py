"""Tiny random-weight model files built with ComfyUI's own classes, shaped so that ComfyUI's loaders
detect the real family (see DESIGN.md section 6). Built in the test process after ComfyUI is booted."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch


_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.BatchNorm2d)


def seed_offset() -> int:
    """$DOJO_TEST_MODEL_SEED (default 0), added to every tiny model's seed. Only for checking that the
    margins of learning and gradient tests hold for other random models, e.g.
    `for s in 1 2 3 4 5; do DOJO_TEST_MODEL_SEED=$s pytest ...; done` (files get their own cache key)."""
    return int(os.environ.get("DOJO_TEST_MODEL_SEED") or 0)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter from a private generator: fan-in scaled weights, small biases, and
    normalisation layers (found by type, whatever their name) at scale 1 and shift 0, so that signals
    keep their size through the network."""
    g = torch.Generator().manual_seed(seed + 1000 * seed_offset())
    with torch.no_grad():
        for sub in module.modules():
            is_norm = isinstance(sub, _NORMS) or "norm" in type(sub).__name__.lower()
            for name, p in sub.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(1.0 if name in ("weight", "scale") else 0.0)
                elif p.ndim >= 2:
                    fan_in = math.prod(p.shape[1:])
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)


HUNYUAN_VIDEO_TINY = dict(
    image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2], vec_in_dim=768,
    axes_dim=[16, 56, 56], meanflow=False, context_in_dim=768, hidden_size=256, mlp_ratio=4.0, num_heads=2,
    depth=2, depth_single_blocks=2, theta=256, qkv_bias=True, byt5=False, guidance_embed=True,
    # Fields newer ComfyUI versions added for HunyuanVideo 1.5; off for the original model.
    use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False,
)


def write_tiny_hunyuan_video(path: Path, seed: int = 0) -> Path:
    """A ~10 M-parameter HunyuanVideo transformer that UNETLoader detects as HunyuanVideo."""
    import comfy.ldm.hunyuan_video.model as hv
    import comfy.ops
    import safetensors.torch
    import dataclasses
    known = {f.name for f in dataclasses.fields(hv.HunyuanVideoParams)}
    config = {k: v for k, v in HUNYUAN_VIDEO_TINY.items() if k in known}
    model = hv.HunyuanVideo(**config, operations=comfy.ops.disable_weight_init)
    model.to_empty(device="cpu")
    randomize_(model, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(path))
    return path


# Tiny in-process networks (not loader-detectable; small hidden sizes keep gradient tests fast).
FLUX_TINY_NET = dict(
    in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=64, mlp_ratio=4.0,
    num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10_000, patch_size=2,
    qkv_bias=True, guidance_embed=True, txt_ids_dims=[],
)

HUNYUAN_VIDEO_TINY_NET = dict(
    HUNYUAN_VIDEO_TINY, vec_in_dim=32, context_in_dim=48, hidden_size=64, axes_dim=[8, 12, 12],
)


def _build(cls, params_cls, config: dict, seed: int):
    import dataclasses
    import comfy.ops
    known = {f.name for f in dataclasses.fields(params_cls)}
    model = cls(**{k: v for k, v in config.items() if k in known}, operations=comfy.ops.disable_weight_init)
    model.to_empty(device="cpu")
    randomize_(model, seed)
    model.requires_grad_(False)
    return model


def build_tiny_flux(seed: int = 0) -> torch.nn.Module:
    """ComfyUI's own Flux network (comfy.ldm.flux.model.Flux), tiny and random."""
    import comfy.ldm.flux.model as flux
    return _build(flux.Flux, flux.FluxParams, FLUX_TINY_NET, seed)


def build_tiny_hunyuan_video_net(seed: int = 0) -> torch.nn.Module:
    """ComfyUI's own HunyuanVideo network, tiny and random."""
    import comfy.ldm.hunyuan_video.model as hv
    return _build(hv.HunyuanVideo, hv.HunyuanVideoParams, HUNYUAN_VIDEO_TINY_NET, seed)


def tiny_inputs(family: str, seed: int = 1, batch: int = 1) -> tuple[tuple, dict]:
    """(args, kwargs) for the tiny network's forward: latents, timestep, text context, pooled, guidance."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 16, 8, 8) if family == "flux" else (batch, 16, 2, 8, 8)
    x = torch.randn(shape, generator=g)
    t = torch.rand(batch, generator=g)
    context = torch.randn(batch, 6, 48, generator=g)
    kwargs = dict(y=torch.randn(batch, 32, generator=g), guidance=torch.full((batch,), 3.5))
    return (x, t, context), kwargs
