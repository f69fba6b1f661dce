"""Train a textual-inversion embedding on a ComfyUI MODEL + CLIP: the glue between the node and the engine.

Only new fp32 vectors train. They reach the text encoder the way ComfyUI's own embeddings do: a
prompt word `embedding:<name>` that a CLIP clone's tokenizer copy resolves to the vectors (see
comfy_compat.clip_with_embeddings), so each step encodes the batch's captions through the CLIP's own
path (clip skip, weights, patches) with the vectors spliced into the token list, and gradients reach
them through ComfyUI's process_tokens. The MODEL trains on a clone as the LoRA trainer's does; neither
the shared CLIP nor the shared MODEL is changed: their outputs afterwards are bit-identical.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..training import families
from ..training.batches import BatchSchedule
from ..training.checkpoints import RunCheckpoints
from ..training.distributed import data_parallel
from ..training.encoded import fingerprint_samples
from ..training.families import FamilyLike
from ..training.grad_safety import copy_on_write_saved_tensors
from ..training.loop import Callbacks, TrainConfig, TrainState, train
from ..training.protocol import Conditioning
from ..training.textual_inversion import (CaptionMode, EmbeddingVectors, TextualInversionModel,
                                          caption_sample, initial_vectors, training_captions)
from . import comfy_compat as cc
from .comfy_model import trainable_view
from .failures import training_failures
from .grad_protection import training_region
from .memory_planning import PlanRequest, settle, step_job
from .paths import check_name_text
from .previews import PreviewRequest, TrainingPreviews, embedding_prompt
from .progress import TrainingProgress

log = logging.getLogger("comfyui-dojo")


@dataclass
class DojoEmbedding:
    """An embedding in memory: fp32 vectors per encoder ("clip_l" [n, 768], "clip_g" [n, 1280]), the
    name prompts use (`embedding:<name>`), and the metadata Save writes."""
    name: str
    vectors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


@dataclass
class EmbeddingJob:
    name: str
    train: TrainConfig
    num_vectors: int = 1
    init_word: str = "*"
    caption_mode: CaptionMode = CaptionMode.OBJECT
    trigger_word: str = ""
    batch_size: int = 1
    checkpoint_every: int = 0
    checkpoint_dir: Path | None = None
    resume_from: Path | None = None
    extra_metadata: dict = field(default_factory=dict)
    memory_plan: bool = False    # plan before step 1 (checkpointing the UNet when the step would not fit)
    previews: PreviewRequest | None = None   # positive / negative as prompt strings (see train_embedding)


@dataclass
class EmbeddingResult:
    embedding: DojoEmbedding
    losses: list[float]
    steps_done: int
    cancelled: bool
    last_checkpoint: Path | None
    memory_plan: object | None = None    # the memory planner's Plan, when the job asked for one
    samples: list = field(default_factory=list)   # previews.Sample, in step order


def check_embedding_name(name: str) -> str:
    name = (name or "").strip()
    check_name_text(name, "embedding_name")
    if not name or name.startswith(".") or any(c.isspace() for c in name) or any(c in name for c in ",()[]<>:\\/"):
        raise ValueError(f"embedding name '{name}' cannot be used in a prompt as embedding:<name>; use letters, "
                         "digits, '_' or '-' (e.g. my_cat)")
    return name


def check_clip_fits(clip, family: FamilyLike) -> list[str]:
    """The CLIP's encoder keys, when they are the ones the family's embeddings hold (its spec's
    `text_encoders`); families without any take no embedding."""
    spec = families.as_spec(family)
    if not spec.text_encoders:
        supported = " and ".join(s.label for s in families.all_specs() if s.text_encoders)
        raise cc.UnsupportedModelError(f"textual inversion supports {supported}; this MODEL is {spec.family.value}")
    keys = cc.clip_encoder_keys(clip)
    if tuple(keys) != tuple(sorted(spec.text_encoders)):
        raise ValueError(f"the CLIP has text encoders {keys} but a {spec.family.value} embedding needs "
                         f"{list(spec.text_encoders)}: connect the CLIP of the same checkpoint as the MODEL")
    return keys


def batch_conditioning(encoded: list[tuple[torch.Tensor, torch.Tensor | None, dict]]) -> Conditioning:
    """Stack per-caption CLIP outputs (with their autograd graph) into one batch Conditioning."""
    context = torch.cat([c for c, _, _ in encoded])
    pooled = None if encoded[0][1] is None else torch.cat([p for _, p, _ in encoded])
    extra = {}
    for name, value in encoded[0][2].items():
        if torch.is_tensor(value):
            extra[name] = torch.cat([e[2][name] for e in encoded])
        elif isinstance(value, (bool, int, float)):
            extra[name] = value
    return Conditioning(context, pooled, extra)


def train_embedding(model_patcher, clip, latents: list[torch.Tensor], captions: list[str],
                    job: EmbeddingJob) -> EmbeddingResult:
    """`latents` (VAE space, one per sample; repeats may share a tensor) and their `captions`."""
    if not latents:
        raise ValueError("the dataset is empty: point Dojo Load Image Dataset at a folder with images")
    name = check_embedding_name(job.name)
    if not 1 <= job.num_vectors <= 16:
        raise ValueError(f"number of vectors must be 1 to 16 (got {job.num_vectors})")
    job.train.validate()
    spec = cc.model_spec(model_patcher)
    family = spec.family
    keys = check_clip_fits(clip, spec)
    per_item = training_captions(job.caption_mode, captions, f"embedding:{name}", job.trigger_word)
    unique = list(dict.fromkeys(c for cs in per_item for c in cs))
    progress = TrainingProgress(job.train.steps)

    with trainable_view(model_patcher) as view, data_parallel() as parallel:
        patcher = view.patcher
        device = cc.compute_device(patcher)
        rows = {k: cc.clip_token_rows(clip, k, job.init_word) for k in keys}
        vectors = EmbeddingVectors({k: initial_vectors(r, job.num_vectors) for k, r in rows.items()})
        train_clip = cc.clip_with_embeddings(clip, {name: vectors.vectors}, for_training=True)
        cc.prepare_clip_for_training(train_clip)
        chunks = {c: cc.clip_token_chunks(train_clip, c) for c in unique}
        index = {c: i for i, c in enumerate(unique)}
        samples, sample_captions = [], []
        for latent in {tuple(x.shape): x for x in latents}.values():
            cc.check_latents_fit(patcher, spec, latent)
        for latent, cs in zip(latents, per_item):
            model_latent = cc.process_latent_in(patcher, latent[None].float().clone())[0]
            for c in cs:
                samples.append(caption_sample(model_latent, index[c], chunks[c]))
                sample_captions.append(c)
        run = {"family": family.value, "adapter": "textual_inversion", "rank": job.num_vectors, "alpha": None,
               "targets": None, "embedding_name": name, "init_word": job.init_word,
               "caption_mode": CaptionMode(job.caption_mode).value, "batch_size": job.batch_size,
               "dataset_fingerprint": fingerprint_samples(samples, sample_captions), "steps": job.train.steps,
               **job.train.to_dict()}

        def encode(batch_captions: list[str]) -> Conditioning:
            # ComfyUI's CLIP layers add residuals in place (`x += attn(norm(x))`) on tensors autograd
            # saved; the engine's copy-on-write protection keeps those gradients exact (the saved
            # tensors' unpack hooks outlive the region, so backward later is covered).
            with copy_on_write_saved_tensors():
                return batch_conditioning([cc.clip_encode_text(train_clip, c) for c in batch_captions])

        model = TextualInversionModel(view, unique, encode)
        checkpoints = RunCheckpoints(job.checkpoint_dir if parallel.is_main else None, run, vectors)

        state, optimizer_state = TrainState(), None
        if job.resume_from is not None:
            step, losses, optimizer_state = checkpoints.resume(job.resume_from)
            state = TrainState(step, losses)
            progress.start_at(step, losses)
        plan = None
        if job.memory_plan:
            # The UNet's checkpointing is the one memory setting of this trainer; no input exposes it, so
            # the plan may turn it on when the step would not fit without.
            plan = settle(step_job(model, patcher, samples, job.batch_size, job.train, vectors.parameters(), device),
                          patcher, device, checkpointing=False, blocks_to_swap=0,
                          request=PlanRequest(auto_checkpointing=True, auto_blocks_to_swap=False),
                          what="this textual-inversion job")
        previews = None
        if job.previews is not None:
            # The preview prompt is encoded at each preview by the training CLIP: the vectors as they stand.
            positive, negative = embedding_prompt(job.previews.positive, name), job.previews.negative or ""
            previews = TrainingPreviews(
                replace(job.previews, positive=lambda: cc.encode_prompt(train_clip, positive),
                        negative=lambda: cc.encode_prompt(train_clip, negative)),
                patcher, spec, progress, job.checkpoint_dir if parallel.is_main else None)
        callbacks = Callbacks(on_step=previews.on_step if previews else progress.on_step,
                              should_stop=lambda: parallel.stop_agreed or progress.should_stop(),
                              on_checkpoint=checkpoints.write, is_cancel=cc.is_interrupt)
        with training_failures(checkpoints, progress), \
                training_region(patcher, plan is not None and plan.checkpointing, spec=spec):
            if previews:
                previews.at_start(state.step)
            state, optimizer, scheduler = train(
                model, vectors, BatchSchedule(samples, job.batch_size, job.train.seed), job.train, device=device,
                state=state, optimizer_state=optimizer_state, callbacks=callbacks,
                checkpoint_every=job.checkpoint_every, parallel=parallel)
            if previews and state.step == job.train.steps:
                # Checkpoint first: a cancel during the last preview keeps the finished run.
                checkpoints.write_final(state, optimizer, scheduler)
                previews.at_end(state.step, state.losses[-1] if state.losses else None)
        cancelled = state.step < job.train.steps
        checkpoints.write_final(state, optimizer, scheduler)
        trained = {k: v.to("cpu") for k, v in vectors.state_dict().items()}
    metadata = {"dojo_family": family.value, "dojo_embedding_name": name, "dojo_init_word": job.init_word,
                "dojo_num_vectors": str(job.num_vectors), "dojo_steps": str(state.step),
                "dojo_caption_mode": CaptionMode(job.caption_mode).value,
                "dojo_learning_rate": str(job.train.learning_rate), "dojo_seed": str(job.train.seed),
                **job.extra_metadata}
    return EmbeddingResult(DojoEmbedding(name, trained, metadata), list(state.losses), state.step, cancelled,
                           checkpoints.last, plan, previews.samples if previews else [])
