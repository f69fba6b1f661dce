"""The memory planner over a ComfyUI MODEL (training/memory_plan.py does the arithmetic).

Before step 1 the Train nodes measure one training step of the biggest bucket on fake tensors, through
the very model, adapter and checkpointing / protection region the run will use, compare the estimate
with what is free on the compute device, and either settle the settings left on 'auto' (gradient
checkpointing, blocks_to_swap) or refuse with the settings that would fit.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass

import torch

from .. import __version__
from ..training.memory_plan import (MEASURE_FORMAT, MeasureCache, MemoryPlanRefused, ModelMemory, Plan, StepJob,
                                    biggest_sample, estimate, free_bytes, gb, heap_limit, measure_key,
                                    module_signature, plan, probe_sampling_step, probe_training_step, tensor_bytes)
from ..training.families import FamilySpec
from ..training.optimizers import OptimizerKind
from . import comfy_compat as cc
from .grad_protection import diffusion_model_of, supports_block_swap, training_region, transformer_blocks

log = logging.getLogger("comfyui-dojo")

AUTO, OFF = "auto", "off"
MEMORY_PLAN_OPTIONS = [AUTO, OFF]
MEMORY_PLAN_TOOLTIP = ("auto: before step 1, estimate the peak memory of a step on the biggest bucket (measured "
                       "on fake tensors through the real model) against the free memory; pick gradient "
                       "checkpointing and the fewest swapped blocks that fit where those are left on auto, and "
                       "refuse with settings that would fit when nothing does. off: train without the check.")


@dataclass(frozen=True)
class PlanRequest:
    """Which settings the planner may choose ('auto' in the node) and the values it starts from."""
    auto_checkpointing: bool = True
    auto_blocks_to_swap: bool = True


def _frozen_tensors(module: torch.nn.Module):
    yield from (p for p in module.parameters() if not p.requires_grad)
    yield from module.buffers()


def model_memory(patcher, device: torch.device, spec: FamilySpec | None = None) -> ModelMemory:
    net = diffusion_model_of(patcher)
    total = tensor_bytes(_frozen_tensors(net))
    # The blocks block swap can stream (transformer families); a UNet has none.
    blocks = tuple(tensor_bytes(_frozen_tensors(b)) for b in transformer_blocks(patcher, spec)) \
        if supports_block_swap(patcher, spec) else ()
    # On the CPU the offload device is the compute device: parking a block frees nothing.
    return ModelMemory(total - sum(blocks), blocks, swap_saves_memory=torch.device(device).type != "cpu")


def resident_on(module: torch.nn.Module, device: torch.device) -> int:
    device = torch.device(device)
    return sum(t.numel() * t.element_size() for t in _frozen_tensors(module)
               if t.device.type == device.type)


def weight_dtype_bytes(module: torch.nn.Module) -> int:
    sizes = Counter()
    for p in module.parameters():
        sizes[p.element_size()] += p.numel()
    return sizes.most_common(1)[0][0] if sizes else 2


_CACHES: dict[str | None, MeasureCache] = {}


def measure_cache() -> MeasureCache:
    """The measurements of this process, also kept on disk under ComfyUI's user directory
    (user/dojo/memory-plan) where ComfyUI has made one, as a running ComfyUI does; a script that only
    imports ComfyUI gets the in-process cache and writes nothing."""
    user = cc.user_directory()
    folder = os.path.join(user, "dojo", "memory-plan") if user and os.path.isdir(user) else None
    if folder not in _CACHES:
        _CACHES[folder] = MeasureCache(folder)
    return _CACHES[folder]


def _shapes(value):
    if torch.is_tensor(value):
        return [list(value.shape), str(value.dtype)]
    if isinstance(value, dict):
        return {str(k): _shapes(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    return repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__qualname__


def _measure_parts(model, patcher, samples, batch_size: int, config, params, device, text_encoders) -> dict:
    """What the fake step's peak depends on, for the measurement's cache key."""
    sample = biggest_sample(samples)
    return {"format": MEASURE_FORMAT, "dojo": __version__, "torch": torch.__version__, "comfyui": cc.comfyui_version(),
            "model": type(model).__qualname__, "net": module_signature(diffusion_model_of(patcher)),
            "text_encoders": [module_signature(m) for m in text_encoders],
            "trainable": [[list(p.shape), str(p.dtype)] for p in params],
            "latent": _shapes(sample.latent), "cond": _shapes(vars(sample.cond)), "batch": batch_size,
            "precision": str(config.precision), "min_snr": config.min_snr_gamma is not None,
            "device": torch.device(device).type, "heap_limit": heap_limit(), "options": _shapes(patcher.model_options)}


def preview_shape(request, patcher, spec) -> tuple[tuple[int, ...], int] | None:
    """The latent shape [C, (T,) H, W] and batch of a training preview's sampling forward (2 where
    classifier-free guidance batches the negative prompt), or None without previews."""
    if request is None or request.settings.every <= 0:
        return None
    s = request.settings
    latent = cc.empty_latent(patcher, s.width, s.height, s.frames, spec)
    return tuple(latent.shape[1:]), 1 if s.cfg_for(spec) == 1.0 else 2


def _cached(parts: dict, what: str, run):
    cache, key = measure_cache(), measure_key(parts)
    found = cache.get(key)
    if found is not None:
        log.info("Dojo memory plan: reusing the measured %s", what)
        return found
    t0 = time.perf_counter()
    m = run()
    log.info("Dojo memory plan: measured %s in %.1f s", what, time.perf_counter() - t0)
    cache.put(key, m)
    return m


def step_job(model, patcher, samples, batch_size: int, config, params, device, text_encoders=(),
             preview=None) -> StepJob:
    """The planner's view of a job: `model` is the DenoisingModel the loop trains (the LoRA view, the
    textual-inversion model, or the LoRA view conditioned through a training text encoder), `params` all
    trainable parameters, `text_encoders` the text-encoder networks the step runs (their weights on the
    compute device count as resident), `preview` (the model previews sample, `preview_shape`'s latent
    shape and batch, and samples with encoded conditioning) adds a preview's sampling forward. Each
    measurement is looked up in `measure_cache()` first. (Textual inversion passes no preview: its
    conditioning is encoded from captions each step, and its preview prompt only at sampling time.)"""
    net = diffusion_model_of(patcher)
    device = torch.device(device)
    spec = getattr(model, "spec", None)
    params = list(params)
    parts = _measure_parts(model, patcher, samples, batch_size, config, params, device, text_encoders)

    def measure(checkpointing: bool):
        what = f"step (checkpointing {'on' if checkpointing else 'off'})"
        return _cached({**parts, "checkpointing": checkpointing}, what,
                       lambda: probe_training_step(model, samples, batch_size, config, params,
                                                   lambda gc: training_region(patcher, gc, 0, device, spec), device,
                                                   checkpointing))

    measure_preview = None
    if preview is not None:
        sampler, shape, width, encoded = preview
        sample = biggest_sample(encoded)

        def measure_preview():
            with training_region(patcher, False, 0, device, spec):  # previews sample inside the training region
                return _cached({**parts, "preview": [list(shape), width, _shapes(vars(sample.cond))]},
                               "preview sampling", lambda: probe_sampling_step(sampler, sample, shape, width, device))

    memory = model_memory(patcher, device, spec)
    te_bytes = sum(resident_on(m, device) for m in text_encoders)
    if te_bytes:
        memory = ModelMemory(memory.other_bytes + te_bytes, memory.block_bytes, memory.swap_saves_memory)
    return StepJob(memory, sum(p.numel() for p in params), OptimizerKind(config.optimizer),
                   measure, device_type=device.type, batch_size=batch_size,
                   weight_dtype_bytes=weight_dtype_bytes(net), measure_preview=measure_preview)


def available_memory(patcher, device, text_encoders=()) -> tuple[int, str]:
    """Free memory on the compute device plus what the step's weights already hold there (the estimate
    counts them itself)."""
    free, source = free_bytes(device)
    return free + sum(resident_on(m, device) for m in (diffusion_model_of(patcher), *text_encoders)), source


def settle(job: StepJob, patcher, device, *, checkpointing: bool, blocks_to_swap: int, request: PlanRequest,
           what: str, text_encoders=()) -> Plan | None:
    """Plan the job; show and log the plan; raise MemoryPlanRefused (before step 1) when nothing fits.
    None when the step could not be measured (an op without a fake-tensor kernel, say): training then
    goes ahead with the settings as given, as with memory_plan 'off'."""
    available, source = available_memory(patcher, device, text_encoders)
    try:
        p = plan(job, available, torch.device(device).type,
                 checkpointing=None if request.auto_checkpointing else checkpointing,
                 blocks_to_swap=None if request.auto_blocks_to_swap else blocks_to_swap,
                 default_checkpointing=checkpointing)
    except Exception as exc:
        log.warning("Dojo: the memory plan could not measure a step of %s (%s: %s); training without it",
                    what, type(exc).__name__, exc)
        return None
    report(p, source, what)
    if not p.fits:
        raise MemoryPlanRefused(p, what)
    return p


def report(p: Plan, source: str, what: str) -> str:
    why = f" (chosen: {', '.join(p.chosen)})" if p.chosen else ""
    text = f"Dojo memory plan: {p.summary()}{why}"
    log.info("%s; %s; free = %s, %s kept spare", text, p.estimate.parts(), source, gb(p.margin))
    cc.show_progress_text(text)
    return text


def table(job: StepJob, available: int, device_type: str) -> list[str]:
    """Every choice the planner weighs, for Dojo Estimate Memory."""
    rows = [f"{'checkpointing':>13} {'swapped':>7} {'estimate':>10}  parts"]
    swaps = sorted({0, len(job.model.block_bytes) // 4, len(job.model.block_bytes) // 2,
                    len(job.model.block_bytes)}) if job.model.swap_saves_memory else [0]
    for gc in (False, True):
        for swap in (swaps if gc else [0]):
            e = estimate(job, gc, swap)
            rows.append(f"{'on' if gc else 'off':>13} {swap:>7} {gb(e.total):>10}  {e.parts()}")
    rows.append(f"available: {gb(available)} on {device_type}")
    return rows


__all__ = ["MEMORY_PLAN_OPTIONS", "MEMORY_PLAN_TOOLTIP", "PlanRequest", "settle", "step_job", "table",
           "available_memory", "measure_cache", "preview_shape", "MemoryPlanRefused", "AUTO", "OFF"]
