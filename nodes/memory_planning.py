"""The memory planner over a ComfyUI MODEL (training/memory_plan.py does the arithmetic).

Before step 1 the Train nodes measure one training step of the biggest bucket on fake tensors, through
the very model, adapter and checkpointing / protection region the run will use, compare the estimate
with what is free on the compute device, and either settle the settings left on 'auto' (gradient
checkpointing, blocks_to_swap) or refuse with the settings that would fit.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch

from ..training.memory_plan import (MemoryPlanRefused, ModelMemory, Plan, StepJob, estimate, free_bytes, gb, plan,
                                    probe_training_step, tensor_bytes)
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


def step_job(model, patcher, samples, batch_size: int, config, params, device) -> StepJob:
    """The planner's view of a job: `model` is the DenoisingModel the loop trains (the LoRA view, or the
    textual-inversion model), `params` the trainable parameters."""
    net = diffusion_model_of(patcher)
    device = torch.device(device)
    spec = getattr(model, "spec", None)

    def measure(checkpointing: bool):
        return probe_training_step(model, samples, batch_size, config, params,
                                   lambda gc: training_region(patcher, gc, 0, device, spec), device, checkpointing)

    return StepJob(model_memory(patcher, device, spec), sum(p.numel() for p in params), OptimizerKind(config.optimizer),
                   measure, device_type=device.type, batch_size=batch_size,
                   weight_dtype_bytes=weight_dtype_bytes(net))


def available_memory(patcher, device) -> tuple[int, str]:
    free, source = free_bytes(device)
    return free + resident_on(diffusion_model_of(patcher), device), source


def settle(job: StepJob, patcher, device, *, checkpointing: bool, blocks_to_swap: int, request: PlanRequest,
           what: str) -> Plan | None:
    """Plan the job; show and log the plan; raise MemoryPlanRefused (before step 1) when nothing fits.
    None when the step could not be measured (an op without a fake-tensor kernel, say): training then
    goes ahead with the settings as given, as with memory_plan 'off'."""
    available, source = available_memory(patcher, device)
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
           "available_memory", "MemoryPlanRefused", "AUTO", "OFF"]
