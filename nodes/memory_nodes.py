"""Dojo Estimate Memory: the memory plan of a LoRA job, without training (seconds, not a crash later)."""
from __future__ import annotations

import torch

from ..training.adapters import AdapterConfig, AdapterType, attach_adapter
from ..training.batches import Sample
from ..training.loop import Precision, TrainConfig
from ..training.memory_plan import gb, plan
from ..training.optimizers import OptimizerKind
from ..training.protocol import TargetPreset
from . import comfy_compat as cc
from .comfy_compat import io
from .comfy_model import ComfyDenoisingModel, trainable_view
from .memory_planning import AUTO, available_memory, step_job, table
from .train_lora import resolve_auto_settings
from .types import EncodedDatasetType


def estimate_lora_memory(model, dataset, *, batch_size: int, rank: int, targets: str, adapter: str,
                         optimizer: str, gradient_checkpointing: str, blocks_to_swap: int,
                         precision: str) -> tuple[str, dict]:
    """The plan Dojo Train LoRA would make for these settings ('auto' and -1 as there), as text."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: encode a folder with at least one image first")
    auto = resolve_auto_settings(ComfyDenoisingModel(model), rank=rank, targets=targets,
                                 gradient_checkpointing=gradient_checkpointing)
    config = TrainConfig(steps=1, optimizer=OptimizerKind(optimizer), precision=Precision(precision))
    batch_size = min(batch_size, len(dataset))
    with trainable_view(model) as view:
        patcher = view.patcher
        device = cc.compute_device(patcher)
        samples = [Sample(cc.process_latent_in(patcher, s.latent[None].float())[0], s.cond)
                   for s in dataset.samples]
        attached = attach_adapter(view.diffusion_model, view.adaptable_modules(auto.targets),
                                  AdapterConfig(AdapterType(adapter), rank=auto.rank, alpha=float(auto.rank)))
        try:
            job = step_job(view, patcher, samples, batch_size, config, attached.parameters(), device)
            available, source = available_memory(patcher, device)
            p = plan(job, available, torch.device(device).type,
                     checkpointing=None if gradient_checkpointing == AUTO else auto.gradient_checkpointing,
                     blocks_to_swap=None if blocks_to_swap < 0 else blocks_to_swap,
                     default_checkpointing=auto.gradient_checkpointing)
            rows = table(job, available, torch.device(device).type)
        finally:
            attached.detach()
    sample = max(dataset.samples, key=lambda s: s.latent.numel())
    lines = [p.summary(),
             f"estimate: {p.estimate.parts()}",
             f"free: {gb(available)} ({source}), {gb(p.margin)} kept spare",
             f"job: {view.family.value}, biggest bucket latent {list(sample.latent.shape)} x batch {batch_size}, "
             f"{auto.targets.value} rank {auto.rank}, {optimizer}, {precision}"]
    if p.chosen:
        lines.append("chosen: " + ", ".join(p.chosen))
    if not p.fits:
        lines.append("would fit: " + "; ".join(p.suggestions))
    lines += ["", *rows]
    return "\n".join(lines), {"fits": p.fits, "estimate": p.estimate.total, "activations": p.estimate.activations,
                               "available": available}


class DojoEstimateMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoEstimateMemory",
            display_name="Dojo Estimate Memory",
            category="Dojo/train",
            is_output_node=True,
            description="Estimates the peak memory of one Dojo Train LoRA step on the biggest bucket (measured on "
                        "fake tensors through the real model, no training) against the free memory, and shows the "
                        "plan Train LoRA's memory_plan 'auto' would choose: try settings in seconds.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the LoRA would train on."),
                EncodedDatasetType.Input("dataset", tooltip="From Dojo Encode Dataset; its biggest bucket is planned."),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip="Samples per step, as in Train LoRA."),
                io.Int.Input("rank", default=0, min=0, max=1024, tooltip="LoRA rank. 0 = the family default."),
                io.Combo.Input("targets", options=[AUTO] + [t.value for t in TargetPreset], default=AUTO,
                               tooltip="Layers to adapt, as in Train LoRA."),
                io.Combo.Input("adapter", options=[a.value for a in AdapterType], default=AdapterType.LORA.value,
                               tooltip="Adapter kind, as in Train LoRA."),
                io.Combo.Input("optimizer", options=[o.value for o in OptimizerKind],
                               default=OptimizerKind.ADAMW.value,
                               tooltip="Optimizer: its state per parameter (AdamW 8 bytes, 8-bit 2, Prodigy 16)."),
                io.Combo.Input("gradient_checkpointing", options=[AUTO, "on", "off"], default=AUTO,
                               tooltip="auto = let the plan choose, as Train LoRA's memory_plan does."),
                io.Int.Input("blocks_to_swap", default=-1, min=-1, max=1000,
                             tooltip="-1 = let the plan choose; 0 = no block swap; N = stream the last N blocks."),
                io.Combo.Input("precision", options=[p.value for p in Precision], default=Precision.BF16.value,
                               tooltip="bf16 autocast or full fp32, as in Train LoRA."),
            ],
            outputs=[io.String.Output(display_name="plan", tooltip="The estimate, the free memory and the plan.")],
        )

    @classmethod
    def execute(cls, model, dataset, batch_size, rank, targets, adapter, optimizer, gradient_checkpointing,
                blocks_to_swap, precision) -> io.NodeOutput:
        text, _ = estimate_lora_memory(model, dataset, batch_size=batch_size, rank=rank, targets=targets,
                                       adapter=adapter, optimizer=optimizer,
                                       gradient_checkpointing=gradient_checkpointing,
                                       blocks_to_swap=blocks_to_swap, precision=precision)
        return io.NodeOutput(text, ui={"text": [text]})
