"""Tiny random-weight model files built with ComfyUI's own classes, shaped so that ComfyUI's loaders
detect the real family (see DESIGN.md section 6). Built in the test process after ComfyUI is booted."""
from __future__ import annotations

import math
from pathlib import Path

import torch


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter from a private generator: fan-in scaled weights, norm scales at 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith(("weight", "scale")):
                p.fill_(1.0)
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
