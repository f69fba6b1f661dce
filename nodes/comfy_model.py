"""`DenoisingModel` over ComfyUI's MODEL (a ModelPatcher): what the Train nodes hand the engine.

Prediction goes through ComfyUI's own `apply_model`, so every family's input scaling, timestep
conversion and extra conditions are ComfyUI's; a diffusion-model wrapper (passed per call, never
installed on the shared model) hands back the network's raw output, which is the native target
(eps, v or flow velocity) that the engine trains on.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..training.protocol import Conditioning, Family, TargetPreset, select_linears
from . import comfy_compat as cc

# Regular expressions over ComfyUI's module names (diffusion_model.*), per family and preset.
_TARGETS = {
    Family.SD15: {
        TargetPreset.ATTENTION: r"attn[12]\.to_",
        TargetPreset.ATTENTION_MLP: r"attn[12]\.to_|\.ff\.net\.",
        TargetPreset.ALL_LINEAR: r".",
    },
    Family.FLUX: {
        TargetPreset.ATTENTION: r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12]",
        TargetPreset.ATTENTION_MLP: r"double_blocks\.\d+\.((img|txt)_attn\.(qkv|proj)|(img|txt)_mlp\.[02])"
                                    r"|single_blocks\.\d+\.linear[12]",
        TargetPreset.ALL_LINEAR: r"(double|single)_blocks\.\d+\.",
    },
}
_TARGETS[Family.SDXL] = _TARGETS[Family.SD15]
_TARGETS[Family.HUNYUAN_VIDEO] = _TARGETS[Family.FLUX]


class ComfyDenoisingModel:
    """The engine's view of a ComfyUI MODEL. Holds the patcher; never changes the shared module."""

    def __init__(self, model_patcher):
        self.patcher = model_patcher
        self.family = cc.model_family(model_patcher)
        self.schedule = cc.noise_schedule(model_patcher)

    @property
    def diffusion_model(self) -> nn.Module:
        return self.patcher.model.diffusion_model

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sigma = cc.comfy_sigma(self.patcher, t, self.schedule)
        x = noisy
        if not self.schedule.is_flow:
            # Engine latents are variance-preserving; ComfyUI's discrete models take x0 + sigma*noise
            # and rescale it by 1/sqrt(sigma^2 + 1) themselves.
            x = noisy * (sigma ** 2 + 1).sqrt().reshape(-1, *([1] * (noisy.ndim - 1))).to(noisy.dtype)
        kwargs = cc.model_kwargs(self.patcher.model, x, cond.context, cond.pooled, self.batch_extras(noisy, cond))
        captured, options = cc.raw_output_capture()
        self.patcher.model.apply_model(x, sigma, transformer_options=options, **kwargs)
        return captured["output"].float()

    def batch_extras(self, noisy: torch.Tensor, cond: Conditioning) -> dict:
        """Conditioning extras the family needs for training. SDXL conditions on the image size:
        a training batch is described as an uncropped image of exactly its own size (as kohya does
        for bucketed data), unless the encoded conditioning already says otherwise."""
        if self.family in (Family.FLUX, Family.HUNYUAN_VIDEO):
            # Guidance-distilled models train at guidance 1 (ai-toolkit, musubi-tuner), not at ComfyUI's
            # sampling default (3.5 / 6), unless the encoded conditioning carries its own.
            return {"guidance": 1.0, **cond.extra}
        if self.family is not Family.SDXL:
            return cond.extra
        height, width = noisy.shape[-2] * 8, noisy.shape[-1] * 8
        sizes = {"width": width, "height": height, "target_width": width, "target_height": height,
                 "crop_w": 0, "crop_h": 0}
        return {**sizes, **cond.extra}

    def adaptable_modules(self, preset: TargetPreset) -> dict[str, nn.Module]:
        return select_linears(self.diffusion_model, _TARGETS[self.family][TargetPreset(preset)])


@contextmanager
def trainable_view(model_patcher):
    """A view of a training clone of `model_patcher` that autograd can run through: inside
    `inference_mode(False)` + `enable_grad`, loaded by ComfyUI, inference tensors made ordinary."""
    with torch.inference_mode(False), torch.enable_grad():
        patcher = cc.training_clone(model_patcher)
        cc.load_for_compute(patcher)
        cc.materialize_inference_tensors(patcher.model)
        yield ComfyDenoisingModel(patcher)
