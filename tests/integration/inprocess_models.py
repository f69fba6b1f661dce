"""Small ComfyUI models built in the test process (no loader detection involved), wrapped in ComfyUI's
ModelPatcher exactly as its loaders return them. For fast engine-through-ComfyUI tests; the loader-
detectable files live in tiny_files.py."""
from __future__ import annotations

import torch

from tiny_comfy_models import FLUX_TINY_NET, HUNYUAN_VIDEO_TINY_NET, randomize_


def patcher_for(config, seed: int, dtype: torch.dtype = torch.float32):
    """Build ComfyUI's BaseModel for a comfy.supported_models config the way its loaders do, with random
    weights in `dtype`, and wrap it in a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher
    config.set_inference_dtype(dtype, None)
    with torch.inference_mode():  # as in ComfyUI's loaders: parameters are inference tensors
        model = config.get_model({})
        randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def _patcher(config_name: str, unet_config: dict, seed: int, dtype: torch.dtype = torch.float32):
    import comfy.supported_models
    return patcher_for(getattr(comfy.supported_models, config_name)(dict(unet_config, dtype=dtype)), seed, dtype)


def tiny_flux_patcher(seed: int = 0):
    """A Flux.1 (dev-style, guidance-embedded) BaseModel with a tiny network: context 48, pooled 32."""
    return _patcher("Flux", dict(FLUX_TINY_NET, image_model="flux"), seed)


def tiny_hunyuan_video_patcher(seed: int = 0):
    """A HunyuanVideo BaseModel with a tiny network: context 48, pooled 32."""
    return _patcher("HunyuanVideo", HUNYUAN_VIDEO_TINY_NET, seed)


def tiny_sd15_config(model_channels: int = 32, context_dim: int = 768) -> dict:
    """ComfyUI's SD15 UNet config for a 2-level UNet of width `model_channels`."""
    return {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 0],
        "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 0,
        "use_spatial_transformer": True, "legacy": False,
        "context_dim": context_dim, "num_heads": 4, "num_head_channels": -1, "use_linear_in_transformer": False,
        "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def tiny_sd15_patcher(seed: int = 0, model_channels: int = 32, context_dim: int = 768):
    """An SD1.5 BaseModel (eps, ComfyUI's SD15 config) with a 2-level UNet of width `model_channels`."""
    return _patcher("SD15", tiny_sd15_config(model_channels, context_dim), seed)
