"""Every ComfyUI import the pack makes lives here, so that ComfyUI version differences have one home.

Supported: ComfyUI 0.8.0 (oldest) to 0.33.x (main target). Node modules import `io` and helpers from
this module, never from ComfyUI directly.
"""
from __future__ import annotations

import math

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.supported_models
import comfy.utils
import folder_paths  # noqa: F401  (re-exported for the file-handling nodes)
from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401

from ..training.protocol import Family, NoiseSchedule, Prediction

# ComfyUI's model configs (comfy.supported_models) -> the family Dojo trains. Subclasses count too
# (SDXL refiners etc. are not listed because their conditioning differs and they are not supported).
_FAMILY_BY_CONFIG = {
    "SD15": Family.SD15,
    "SDXL": Family.SDXL,
    "Flux": Family.FLUX,
    "FluxSchnell": Family.FLUX,
    "HunyuanVideo": Family.HUNYUAN_VIDEO,
}


class UnsupportedModelError(ValueError):
    pass


def model_family(model_patcher) -> Family:
    config_name = type(model_patcher.model.model_config).__name__
    family = _FAMILY_BY_CONFIG.get(config_name)
    if family is None:
        supported = ", ".join(sorted({f.value for f in _FAMILY_BY_CONFIG.values()}))
        raise UnsupportedModelError(
            f"Dojo cannot train this MODEL: ComfyUI detected it as '{config_name}'. "
            f"Supported families: {supported}. Load one of those with ComfyUI's checkpoint or diffusion-model loader.")
    return family


def noise_schedule(model_patcher) -> NoiseSchedule:
    """Read the prediction type and noise schedule from the model's own `model_sampling`."""
    sampling = model_patcher.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.CONST):
        shift = float(getattr(sampling, "shift", 1.0))
        if isinstance(sampling, comfy.model_sampling.ModelSamplingFlux):
            # Flux's "shift" is mu of an exponential time shift; exp(mu) is the equivalent linear shift.
            shift = math.exp(shift)
        return NoiseSchedule(Prediction.FLOW, shift=shift)
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        prediction = Prediction.V
    elif isinstance(sampling, comfy.model_sampling.EPS):
        prediction = Prediction.EPSILON
    else:
        raise UnsupportedModelError(f"Dojo cannot train a model whose sampling is {type(sampling).__name__}.")
    sigmas = sampling.sigmas.detach().to("cpu", torch.float64)
    return NoiseSchedule(prediction, alphas_cumprod=1.0 / (1.0 + sigmas ** 2))


def load_for_compute(model_patcher) -> None:
    """Let ComfyUI put the model (and the clone's patches) on its compute device."""
    comfy.model_management.load_models_gpu([model_patcher])


def compute_device(model_patcher) -> torch.device:
    return model_patcher.load_device


def comfy_sigma(model_patcher, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """ComfyUI's sigma for training time t: the VE sigma of the discrete timestep, or t itself for flow."""
    if schedule.is_flow:
        return t.float()
    sampling = model_patcher.get_model_object("model_sampling")
    return sampling.sigmas.to(t.device)[schedule.timestep_index(t)].float()


def model_kwargs(base_model, noisy: torch.Tensor, context, pooled, extra: dict) -> dict:
    """The keyword inputs ComfyUI's own `extra_conds` builds for this family (crossattn, y, guidance, ...)."""
    conds = base_model.extra_conds(noise=noisy, device=noisy.device, cross_attn=context,
                                   pooled_output=pooled, **extra)
    batch = noisy.shape[0]
    return {name: cond.process_cond(batch_size=batch, area=None).cond for name, cond in conds.items()}


def raw_output_capture():
    """A diffusion-model wrapper that records the network's raw output (before ComfyUI turns it into
    a denoised x0), and the transformer_options that install it for one call."""
    captured = {}

    def wrapper(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        captured["output"] = out
        return out

    options = {"wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"dojo_capture": [wrapper]}}}
    return captured, options


def _rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE (pair k = elements 2k, 2k+1) in plain, differentiable torch ops.
    freqs_cis [..., L, D/2, 2, 2] holds each pair's 2x2 rotation."""
    pairs = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    if freqs_cis.ndim > 2 and x.ndim > 2 and x.shape[2] != 1 and freqs_cis.shape[2] > x.shape[2]:
        freqs_cis = freqs_cis[:, :, :x.shape[2]]
    return (freqs_cis * pairs).sum(-1).reshape(x.shape).type_as(x)


def _rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    return _rope1(xq, freqs_cis), _rope1(xk, freqs_cis)


def rope_substitutions() -> dict:
    """comfy-kitchen's RoPE ops have no autograd formula and Flux / HunyuanVideo call them whenever
    comfy-kitchen is importable (always on 0.8; on 0.33 unless `in_training` is set), on CPU too.
    Map them to differentiable equivalents; the training protection applies this thread-locally."""
    try:
        kitchen = torch.ops.comfy_kitchen
        ops = {"apply_rope": (kitchen.apply_rope, _rope), "apply_rope1": (kitchen.apply_rope1, _rope1)}
    except (AttributeError, RuntimeError):  # comfy-kitchen not loaded: ComfyUI uses plain torch RoPE
        return {}
    subs = {}
    for packet, replacement in ops.values():
        subs[packet] = replacement
        for name in packet.overloads():
            subs[getattr(packet, name)] = replacement
    return subs
