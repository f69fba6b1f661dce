"""Train a LoRA on a ComfyUI MODEL: the glue between the node and the engine's loop.

The cached MODEL is never changed for good: training happens on a clone inside
`torch.inference_mode(False)`; the adapter layers are attached to the (shared) diffusion model only for
the duration of the run and detached in `finally`, with every module object and requires_grad flag
restored, so the base model's outputs afterwards are bit-identical to before.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..training.adapters import AdapterConfig, AdapterType, attach_adapter
from ..training.batches import BatchSchedule, Sample
from ..training.checkpoints import RunCheckpoints
from ..training.encoded import EncodedDataset
from ..training.loop import Callbacks, TrainConfig, TrainState, train
from ..training.lora_formats import factors_from_state_dict, lora_state_dict
from ..training.protocol import Family, TargetPreset
from . import comfy_compat as cc
from .comfy_model import trainable_view
from .grad_protection import training_region
from .previews import PreviewRequest, TrainingPreviews
from .progress import TrainingProgress

log = logging.getLogger("comfyui-dojo")


class TrainingOutOfMemory(RuntimeError):
    def __init__(self, step: int, kept: Path | None):
        where = f"the checkpoint {kept} is kept" if kept else "no checkpoint had been written yet"
        super().__init__(f"out of memory at training step {step}. Lower batch_size, the dataset resolution or "
                         f"rank, turn gradient_checkpointing on, or close other programs; {where}.")
        self.step = step


class DojoLoRA(dict):
    """A LoRA in its file layout (what ComfyUI's LoRA loaders read), plus the metadata Save writes."""

    def __init__(self, tensors: dict, metadata: dict | None = None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})


@dataclass
class LoraJob:
    adapter: AdapterConfig
    targets: TargetPreset
    train: TrainConfig
    batch_size: int = 1
    gradient_checkpointing: bool = False
    blocks_to_swap: int = 0              # 0 = off; else the last N blocks stream from the CPU (block swap)
    checkpoint_every: int = 0
    checkpoint_dir: Path | None = None
    resume_from: Path | None = None
    init_lora: dict | None = None        # continue from an existing LoRA's weights (a fresh run otherwise)
    extra_metadata: dict = field(default_factory=dict)
    previews: PreviewRequest | None = None   # sample previews while training (nodes/previews.py)


@dataclass
class LoraResult:
    lora: DojoLoRA
    losses: list[float]
    steps_done: int
    cancelled: bool
    last_checkpoint: Path | None
    samples: list = field(default_factory=list)   # previews.Sample, in step order


def run_identity(job: LoraJob, family: Family, dataset: EncodedDataset) -> dict:
    return {"family": family.value, "adapter": AdapterType(job.adapter.kind).value, "rank": job.adapter.rank,
            "alpha": job.adapter.alpha, "targets": job.targets.value, "batch_size": job.batch_size,
            "dataset_fingerprint": dataset.fingerprint, "steps": job.train.steps,
            **job.train.to_dict()}


def train_lora(model_patcher, dataset: EncodedDataset, job: LoraJob) -> LoraResult:
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: encode a folder with at least one image first")
    job.train.validate()
    batch_size = job.batch_size
    if batch_size > len(dataset):
        log.warning("Dojo: batch size %d is larger than the dataset (%d samples); using %d", batch_size,
                    len(dataset), len(dataset))
        batch_size = len(dataset)
    progress = TrainingProgress(job.train.steps)

    with trainable_view(model_patcher) as view:
        patcher = view.patcher
        device = cc.compute_device(patcher)
        samples = [Sample(cc.process_latent_in(patcher, s.latent[None].float())[0], s.cond) for s in dataset.samples]
        run = run_identity(job, view.family, dataset)
        adapter = attach_adapter(view.diffusion_model, view.adaptable_modules(job.targets), job.adapter,
                                 seed=job.train.seed)
        checkpoints = RunCheckpoints(job.checkpoint_dir, run, adapter)
        diffusers_names = cc.sd_unet_diffusers_names(patcher) if view.family in (Family.SD15, Family.SDXL) else None

        try:
            state, optimizer_state = TrainState(), None
            if job.init_lora is not None:
                adapter.load_low_rank_factors(factors_from_state_dict(
                    view.family, dict(job.init_lora), list(adapter.originals), diffusers_names))
            if job.resume_from is not None:
                step, losses, optimizer_state = checkpoints.resume(job.resume_from)
                state = TrainState(step, losses)
                progress.start_at(step, losses)
            previews = None if job.previews is None else \
                TrainingPreviews(job.previews, patcher, view.family, progress, job.checkpoint_dir)
            callbacks = Callbacks(on_step=previews.on_step if previews else progress.on_step,
                                  should_stop=progress.should_stop, on_checkpoint=checkpoints.write)
            try:
                with training_region(patcher, job.gradient_checkpointing, job.blocks_to_swap, device):
                    if previews:
                        previews.at_start(state.step)
                    state, optimizer, scheduler = train(
                        view, adapter, BatchSchedule(samples, batch_size, job.train.seed), job.train, device=device,
                        state=state, optimizer_state=optimizer_state, callbacks=callbacks,
                        checkpoint_every=job.checkpoint_every)
                    if previews and state.step == job.train.steps:
                        # Checkpoint first: a cancel during the last preview keeps the finished run.
                        checkpoints.write_final(state, optimizer, scheduler)
                        previews.at_end(state.step, state.losses[-1] if state.losses else None)
            except (torch.OutOfMemoryError, MemoryError) as e:
                raise TrainingOutOfMemory(len(progress.losses) + 1, checkpoints.last) from e
            except RuntimeError as e:
                if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
                    raise
                raise TrainingOutOfMemory(len(progress.losses) + 1, checkpoints.last) from e
            cancelled = state.step < job.train.steps
            checkpoints.write_final(state, optimizer, scheduler)
            tensors = lora_state_dict(view.family, adapter.export_factors(), diffusers_names)
        finally:
            adapter.detach()
    metadata = {"dojo_family": view.family.value, "dojo_steps": str(state.step),
                "ss_network_dim": str(job.adapter.rank), "ss_network_alpha": str(job.adapter.alpha),
                "ss_learning_rate": str(job.train.learning_rate), "ss_num_train_images": str(len(dataset)),
                "ss_max_train_steps": str(job.train.steps), "ss_seed": str(job.train.seed),
                # every setting of the run, as one JSON string (read back by Dojo Adapter Info and model cards)
                "dojo_training": json.dumps({**run, "batch_size_used": batch_size, "steps_done": state.step,
                                             "gradient_checkpointing": job.gradient_checkpointing,
                                             "checkpoint_every": job.checkpoint_every,
                                             "dataset_size": len(dataset)}, sort_keys=True, default=str),
                **job.extra_metadata}
    lora = DojoLoRA({k: v.cpu() for k, v in tensors.items()}, metadata)
    return LoraResult(lora, list(state.losses), state.step, cancelled, checkpoints.last,
                      previews.samples if previews else [])
