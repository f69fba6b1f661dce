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

from ..training.protocol import Conditioning, TargetPreset, select_linears
from . import comfy_compat as cc


class ComfyDenoisingModel:
    """The engine's view of a ComfyUI MODEL. Holds the patcher; never changes the shared module."""

    def __init__(self, model_patcher):
        self.patcher = model_patcher
        # Everything family-specific below reads this spec (training/families), never the family id, so
        # a spec built at run time for a model no family claims works the same way.
        self.spec = cc.model_spec(model_patcher)
        self.family = self.spec.family
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
        """Conditioning extras the family needs for training beyond the encoded ones (SDXL's size ids,
        guidance 1 for guidance-distilled models): the spec's `extra_conditions`."""
        return self.spec.extra_conditions(noisy, cond.extra)

    def adaptable_modules(self, preset: TargetPreset) -> dict[str, nn.Module]:
        return select_linears(self.diffusion_model, self.spec.targets[TargetPreset(preset)])


@contextmanager
def trainable_view(model_patcher):
    """A view of a training clone of `model_patcher` that autograd can run through: inside
    `inference_mode(False)` + `enable_grad`, loaded by ComfyUI, inference tensors made ordinary."""
    with torch.inference_mode(False), torch.enable_grad():
        patcher = cc.training_clone(model_patcher)
        cc.load_for_compute(patcher)
        cc.materialize_inference_tensors(patcher.model)
        yield ComfyDenoisingModel(patcher)
