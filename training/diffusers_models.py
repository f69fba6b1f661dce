"""`DenoisingModel` over diffusers models: what engine tests and the demo train.

ComfyUI's MODEL gets its own implementation in the pack's `nodes/`; both present the same protocol, so
the loop and its tests do not care which one they drive.
"""
from __future__ import annotations

import torch
from torch import nn

from .protocol import Conditioning, Family, NoiseSchedule, Prediction, TargetPreset, select_linears

# Regular expressions over diffusers module names, per preset. UNet attention projections live in
# `attn1`/`attn2` (to_q/k/v/out.0); the transformer-block MLP is `ff.net`.
_UNET_TARGETS = {
    TargetPreset.ATTENTION: r"attn[12]\.to_",
    TargetPreset.ATTENTION_MLP: r"attn[12]\.to_|\.ff\.net\.",
    TargetPreset.ALL_LINEAR: r".",
}
# Flux double blocks: image/text attention (to_*, add_*_proj, to_add_out) and MLPs (ff, ff_context);
# single blocks: attention q/k/v, the fused MLP input (proj_mlp) and the fused output (proj_out).
_FLUX_TARGETS = {
    TargetPreset.ATTENTION: r"attn\.(to_|add_)|single_transformer_blocks\.\d+\.proj_out",
    TargetPreset.ATTENTION_MLP: r"attn\.(to_|add_)|\.ff(_context)?\.net\.|single_transformer_blocks\.\d+\.proj_(out|mlp)",
    TargetPreset.ALL_LINEAR: r"transformer_blocks\.\d+\.",
}


def discrete_schedule(prediction: Prediction, num_timesteps: int = 1000,
                      beta_start: float = 0.00085, beta_end: float = 0.012) -> NoiseSchedule:
    """The scaled-linear beta schedule SD1.5 and SDXL were trained with."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return NoiseSchedule(prediction, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))


class DiffusersUNet:
    """SD1.5 / SDXL UNet2DConditionModel. SDXL needs `pooled` and extra["time_ids"]."""

    def __init__(self, unet: nn.Module, family: Family = Family.SD15,
                 prediction: Prediction = Prediction.EPSILON):
        self.unet = unet
        self.family = family
        self.schedule = discrete_schedule(prediction)

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = None
        if self.family is Family.SDXL:
            added = {"text_embeds": cond.pooled, "time_ids": cond.extra["time_ids"]}
        timesteps = self.schedule.timestep_index(t)
        return self.unet(noisy, timesteps, encoder_hidden_states=cond.context,
                         added_cond_kwargs=added).sample

    def adaptable_modules(self, preset: TargetPreset) -> dict[str, nn.Module]:
        return select_linears(self.unet, _UNET_TARGETS[TargetPreset(preset)])


class DiffusersFlux:
    """Flux.1 FluxTransformer2DModel on [B, C, H, W] latents (packed into 2x2 patches here)."""

    def __init__(self, transformer: nn.Module, shift: float = 3.16):
        self.transformer = transformer
        self.family = Family.FLUX
        self.schedule = NoiseSchedule(Prediction.FLOW, shift=shift)

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = noisy.shape
        packed = noisy.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=noisy.device)
        img_ids[..., 1] = torch.arange(h // 2, device=noisy.device)[:, None]
        img_ids[..., 2] = torch.arange(w // 2, device=noisy.device)[None, :]
        txt_ids = torch.zeros(cond.context.shape[1], 3, device=noisy.device)
        guidance = cond.extra.get("guidance")
        if self.transformer.config.guidance_embeds:
            guidance = torch.as_tensor(1.0 if guidance is None else guidance, device=noisy.device,
                                       dtype=torch.float32).expand(b)
        out = self.transformer(packed, encoder_hidden_states=cond.context, pooled_projections=cond.pooled,
                               timestep=t.to(noisy.dtype), img_ids=img_ids.reshape(-1, 3), txt_ids=txt_ids,
                               guidance=guidance).sample
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def adaptable_modules(self, preset: TargetPreset) -> dict[str, nn.Module]:
        return select_linears(self.transformer, _FLUX_TARGETS[TargetPreset(preset)])
