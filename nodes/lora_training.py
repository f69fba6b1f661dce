"""Train a LoRA on a ComfyUI MODEL: the glue between the node and the engine's loop.

The cached MODEL is never changed for good: training happens on a clone inside
`torch.inference_mode(False)`; the adapter layers are attached to the (shared) diffusion model only for
the duration of the run and detached in `finally`, with every module object and requires_grad flag
restored, so the base model's outputs afterwards are bit-identical to before.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path


from ..training.adapters import AdapterConfig, AdapterType, attach_adapter
from ..training.batches import BatchSchedule, Sample
from ..training.checkpoints import RunCheckpoints
from ..training.distributed import PeerLost, data_parallel
from ..training.encoded import EncodedDataset
from ..training.families import FamilySpec
from ..training.file_metadata import latent_resolution, lora_file_keys
from ..training.loop import Callbacks, TrainConfig, TrainState, train
from ..training.lora_formats import check_lora_tensors, factors_from_state_dict, lora_state_dict
from ..training.protocol import TargetPreset
from . import comfy_compat as cc
from .comfy_model import trainable_view
from .failures import training_failures
from .grad_protection import training_region
from .memory_planning import PlanRequest, settle, step_job
from .previews import PreviewRequest, TrainingPreviews
from .progress import TrainingProgress
from .te_lora import JointTrainable, TextEncoderJob, pivotal_embedding, text_encoder_session

log = logging.getLogger("comfyui-dojo")


class DojoLoRA(dict):
    """A LoRA in its file layout (what ComfyUI's LoRA loaders read), plus the metadata Save writes and,
    after pivotal tuning, the embedding trained with it (a DojoEmbedding; Save bundles it in the file)."""

    def __init__(self, tensors: dict, metadata: dict | None = None, embedding=None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})
        self.embedding = embedding


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
    text_encoder: TextEncoderJob | None = None  # also train a LoRA on the CLIP (te_lora.py)
    extra_metadata: dict = field(default_factory=dict)
    memory_plan: PlanRequest | None = None   # None = no memory check; else plan (and settle 'auto') before step 1
    previews: PreviewRequest | None = None   # sample previews while training (nodes/previews.py)


@dataclass
class LoraResult:
    lora: DojoLoRA
    losses: list[float]
    steps_done: int
    cancelled: bool
    last_checkpoint: Path | None
    memory_plan: object | None = None    # the memory planner's Plan, when the job asked for one
    samples: list = field(default_factory=list)   # previews.Sample, in step order


def run_identity(job: LoraJob, spec: FamilySpec, dataset: EncodedDataset) -> dict:
    return {"family": spec.family.value, "adapter": AdapterType(job.adapter.kind).value, "rank": job.adapter.rank,
            "alpha": job.adapter.alpha, "targets": job.targets.value, "batch_size": job.batch_size,
            "dataset_fingerprint": dataset.fingerprint, "steps": job.train.steps,
            **job.train.to_dict(),
            **({"text_encoder_lr": job.text_encoder.learning_rate, "te_targets": job.text_encoder.targets.value,
                "pivotal": None if job.text_encoder.embedding is None else vars(job.text_encoder.embedding)}
               if job.text_encoder is not None else {})}


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

    with trainable_view(model_patcher) as view, data_parallel() as parallel, \
            text_encoder_session(job.text_encoder, view.spec, job.adapter, job.train.seed) as te:
        patcher = view.patcher
        device = cc.compute_device(patcher)
        for shape in {tuple(s.latent.shape): s.latent for s in dataset.samples}.values():
            cc.check_latents_fit(patcher, view.spec, shape)
        samples = [Sample(cc.process_latent_in(patcher, s.latent[None].float())[0], s.cond) for s in dataset.samples]
        run = run_identity(job, view.spec, dataset)
        adapter = attach_adapter(view.diffusion_model, view.adaptable_modules(job.targets), job.adapter,
                                 seed=job.train.seed)
        model, trainable = view, adapter
        if te is not None:  # conditioning from the captions' tokens each step, through the adapted CLIP
            samples, unique = te.conditioned_samples(samples, dataset.captions)
            model = te.model(view, unique)
            trainable = JointTrainable({"unet": (adapter, job.train.learning_rate, 1.0), **te.trainables()})
        # In a data-parallel run only rank 0 writes checkpoints (every rank holds the same weights).
        checkpoints = RunCheckpoints(job.checkpoint_dir if parallel.is_main else None, run, trainable)
        diffusers_names = cc.sd_unet_diffusers_names(patcher) if view.spec.lora_layout.needs_diffusers_names else None

        try:
            state, optimizer_state = TrainState(), None
            if job.init_lora is not None:
                check_lora_tensors(dict(job.init_lora), "continue_from")
                adapter.load_low_rank_factors(factors_from_state_dict(
                    view.spec, dict(job.init_lora), list(adapter.originals), diffusers_names))
            if job.resume_from is not None:
                step, losses, optimizer_state = checkpoints.resume(job.resume_from)
                state = TrainState(step, losses)
                progress.start_at(step, losses)
            plan = None
            if job.memory_plan is not None:
                plan = settle(step_job(view, patcher, samples, batch_size, job.train, adapter.parameters(), device),
                              patcher, device, checkpointing=job.gradient_checkpointing,
                              blocks_to_swap=job.blocks_to_swap, request=job.memory_plan, what="this LoRA job")
                if plan is not None:
                    job = replace(job, gradient_checkpointing=plan.checkpointing, blocks_to_swap=plan.blocks_to_swap)
            # Only rank 0 of a data-parallel run saves samples (every rank samples the same weights).
            previews = None if job.previews is None else \
                TrainingPreviews(job.previews, patcher, view.spec, progress,
                                 job.checkpoint_dir if parallel.is_main else None)
            callbacks = Callbacks(on_step=previews.on_step if previews else progress.on_step,
                                  should_stop=lambda: parallel.stop_agreed or progress.should_stop(),
                                  on_checkpoint=checkpoints.write, is_cancel=cc.is_interrupt)
            try:
                with training_failures(checkpoints, progress), \
                        training_region(patcher, job.gradient_checkpointing, job.blocks_to_swap, device, view.spec):
                    if previews:
                        previews.at_start(state.step)
                    state, optimizer, scheduler = train(
                        model, trainable, BatchSchedule(samples, batch_size, job.train.seed), job.train,
                        device=device, state=state, optimizer_state=optimizer_state, callbacks=callbacks,
                        checkpoint_every=job.checkpoint_every, parallel=parallel)
                    if previews and state.step == job.train.steps:
                        # Checkpoint first: a cancel during the last preview keeps the finished run.
                        checkpoints.write_final(state, optimizer, scheduler)
                        previews.at_end(state.step, state.losses[-1] if state.losses else None)
            except PeerLost as e:
                raise PeerLost(f"{e}; {checkpoints.kept()}") from e
            cancelled = state.step < job.train.steps
            checkpoints.write_final(state, optimizer, scheduler)
            tensors = lora_state_dict(view.spec, adapter.export_factors(), diffusers_names)
            if te is not None:
                tensors.update(te.file_tensors())
                vectors = te.trained_vectors()
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
                **lora_file_keys(view.spec, resolution=latent_resolution([tuple(s.latent.shape) for s in samples]),
                                 captions=dataset.captions, dataset_name=str(dataset.info.get("source") or ""),
                                 unet_lr=job.train.learning_rate, prediction=view.schedule.prediction.value,
                                 text_encoder_lr=job.text_encoder.learning_rate if job.text_encoder else None,
                                 trigger_phrase=dataset.info.get("trigger_word") or None),
                **job.extra_metadata}
    lora = DojoLoRA({k: v.cpu() for k, v in tensors.items()}, metadata)
    pivotal = job.text_encoder.embedding if job.text_encoder is not None else None
    if pivotal is not None:
        lora.embedding = pivotal_embedding(pivotal, vectors, view.spec, state.step)
    return LoraResult(lora, list(state.losses), state.step, cancelled, checkpoints.last, plan,
                      previews.samples if previews else [])
