"""Text-encoder LoRA: peft LoRA layers on a ComfyUI CLIP's text transformers, trained with the diffusion
model's LoRA (SD1.5's CLIP-L, SDXL's CLIP-L and CLIP-G, Flux's CLIP-L).

While the text encoder trains, a batch's conditioning is computed each step from its captions' tokens
(tokenized once, before training) through the CLIP's own encode path (clip skip, weights), so gradients
reach the text encoder's LoRA. The layers live inside the CLIP's (shared) text model only for the run and
are detached in `finally`, with every module object and requires_grad flag restored: the base CLIP's
outputs afterwards are bit-identical to before. Files use kohya's layout, which ComfyUI's LoraLoader
applies through strength_clip and diffusers' `load_lora_weights` loads into the text encoders.
"""
from __future__ import annotations

import enum
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..training import families
from ..training.adapters import AdapterConfig, attach_adapter
from ..training.families import FamilyLike
from ..training.grad_safety import copy_on_write_saved_tensors
from ..training.lora_formats import kohya_keys
from ..training.protocol import select_linears
from ..training.textual_inversion import (CaptionMode, EmbeddingVectors, TextualInversionModel,
                                          caption_sample, initial_vectors, training_captions)
from . import comfy_compat as cc

# kohya's prefixes per text encoder are the family spec's `te_lora_prefixes`, which ComfyUI's
# model_lora_keys_clip maps (lora_te_ for SD1.5's only encoder; SDXL's and Flux's CLIP-L is te1, SDXL's
# CLIP-G te2).
_LAYERS = r"^{enc}\.transformer\.text_model\.encoder\.layers\.\d+\."


class TeTargets(str, enum.Enum):
    ATTENTION = "attention"
    ATTENTION_MLP = "attention_mlp"


_TARGET_PATTERNS = {TeTargets.ATTENTION: r"self_attn\.(q|k|v|out)_proj$",
                    TeTargets.ATTENTION_MLP: r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"}


@dataclass(frozen=True)
class PivotalJob:
    """Pivotal tuning: a new embedding for the trigger word, trained with the LoRA. In every caption the
    trigger word (or `{token}`) becomes `embedding:<name>`; a caption without it gets it in front."""
    name: str
    num_vectors: int = 2
    init_word: str = "*"
    learning_rate: float = 1e-3
    train_fraction: float = 1.0          # the embedding trains for this fraction of the steps, then stays
    trigger_word: str = ""


@dataclass
class TextEncoderJob:
    clip: object                         # ComfyUI CLIP of the same checkpoint as the MODEL
    learning_rate: float                 # the text-encoder LoRA's; 0 = no text-encoder LoRA
    targets: TeTargets = TeTargets.ATTENTION_MLP
    embedding: PivotalJob | None = None


def pivotal_for(pivotal: PivotalJob | None, dataset) -> PivotalJob | None:
    """The pivotal settings with the dataset's trigger word when the node left it empty."""
    if pivotal is None or pivotal.trigger_word:
        return pivotal
    return replace(pivotal, trigger_word=str(dataset.info.get("trigger_word") or ""))


def text_encoder_job(clip, learning_rate: float, targets: str, pivotal: PivotalJob | None = None
                     ) -> TextEncoderJob | None:
    """The node's inputs as a job; None when nothing on the text side trains (learning rate 0, no pivotal
    embedding)."""
    if not learning_rate and pivotal is None:
        return None
    if clip is None:
        what = f"text_encoder_lr is {learning_rate}" if learning_rate else "a pivotal embedding is connected"
        raise ValueError(f"{what} but no CLIP is connected: connect the checkpoint's CLIP to Train LoRA's clip "
                         "input (or set text_encoder_lr to 0 and disconnect pivotal)")
    return TextEncoderJob(clip, float(learning_rate or 0.0), TeTargets(targets), pivotal)


def te_modules(clip, family: FamilyLike, targets: TeTargets) -> dict[str, nn.Module]:
    """The text-transformer linears to adapt, by module name inside `clip.cond_stage_model`."""
    spec = families.as_spec(family)
    prefixes = spec.te_lora_prefixes
    if not prefixes:
        supported = ", ".join(s.label for s in families.all_specs() if s.te_lora_prefixes)
        raise ValueError(f"text-encoder LoRA supports {supported} (their CLIPs); this MODEL is {spec.family.value}")
    root = clip.cond_stage_model
    found = {}
    for enc in prefixes:
        found.update(select_linears(root, _LAYERS.format(enc=enc) + r".*" + _TARGET_PATTERNS[TeTargets(targets)]))
    if not found:
        raise ValueError(f"the CLIP has no {'/'.join(prefixes)} text transformer layers: connect the "
                         f"CLIP of the same checkpoint as the MODEL ({spec.family.value})")
    return found


def te_lora_keys(family: FamilyLike, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                 ) -> dict[str, torch.Tensor]:
    """kohya's layout: `<prefix>text_model_encoder_layers_<i>_<module>.lora_down/up.weight` + `.alpha`."""
    prefixes = families.as_spec(family).te_lora_prefixes
    out = {}
    for name, pair in factors.items():
        enc, _, inner = name.partition(".transformer.")
        out.update(kohya_keys({inner: pair}, prefixes[enc]))
    return out


class TextEncoderSession:
    """The text encoder's LoRA during a run: a training clone of the CLIP with the layers attached, the
    tokens of each caption, and the model view that encodes a batch's captions each step."""

    def __init__(self, job: TextEncoderJob, family: FamilyLike, adapter_config: AdapterConfig, seed: int):
        self.job, self.spec = job, families.as_spec(family)
        self.family = self.spec.family
        self.vectors, table = None, {}
        pivotal = job.embedding
        if pivotal is not None:
            if not self.spec.text_encoders:
                supported = " and ".join(s.label for s in families.all_specs() if s.text_encoders)
                raise ValueError(f"pivotal tuning supports {supported}; this MODEL is {self.family.value}")
            if not 1 <= pivotal.num_vectors <= 16:
                raise ValueError(f"the pivotal embedding needs 1 to 16 vectors (got {pivotal.num_vectors})")
            self.vectors = EmbeddingVectors({k: initial_vectors(cc.clip_token_rows(job.clip, k, pivotal.init_word),
                                                                pivotal.num_vectors)
                                             for k in self.spec.text_encoders})
            table = {pivotal.name: self.vectors.vectors}
        self.clip = cc.clip_with_embeddings(job.clip, table, for_training=True)
        cc.prepare_clip_for_training(self.clip)
        self.adapter = None
        if job.learning_rate > 0:
            self.adapter = attach_adapter(self.clip.cond_stage_model, te_modules(self.clip, self.spec, job.targets),
                                          adapter_config, seed=seed + 1)
        self.tokens: dict[str, dict] = {}

    def trainables(self) -> dict[str, tuple[object, float, float]]:
        """The text side's parts for `JointTrainable`: the text-encoder LoRA and/or the embedding."""
        parts = {}
        if self.adapter is not None:
            parts["te"] = (self.adapter, self.job.learning_rate, 1.0)
        if self.vectors is not None:
            parts["embedding"] = (self.vectors, self.job.embedding.learning_rate, self.job.embedding.train_fraction)
        return parts

    def conditioned_samples(self, samples, captions: list[str]):
        """Samples whose conditioning is a reference to their caption (the cached conditioning is not used:
        the text encoder changes every step), and the distinct captions in reference order."""
        if self.vectors is not None:
            pivotal = self.job.embedding
            captions = [c for [c] in training_captions(CaptionMode.CAPTIONS, captions, f"embedding:{pivotal.name}",
                                                       pivotal.trigger_word)]
        unique = list(dict.fromkeys(captions))
        index = {c: i for i, c in enumerate(unique)}
        for c in unique:
            self.tokens[c] = self.clip.tokenize(c)  # once; each step encodes from these tokens
        out = [caption_sample(s.latent, index[c], max(len(v) for v in self.tokens[c].values()))
               for s, c in zip(samples, captions)]
        return out, unique

    def encode(self, batch_captions: list[str]):
        from .ti_training import batch_conditioning
        encoded = []
        # ComfyUI's CLIP layers add residuals in place on tensors autograd saved (see ti_training.encode)
        with copy_on_write_saved_tensors():
            for c in batch_captions:
                out = self.clip.encode_from_tokens(self.tokens[c], return_pooled=True, return_dict=True)
                cond, pooled = out.pop("cond"), out.pop("pooled_output", None)
                encoded.append((cond, pooled, out))
        return batch_conditioning(encoded)

    def model(self, view, unique: list[str]):
        return TextualInversionModel(view, unique, self.encode)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.adapter is None else te_lora_keys(self.spec, self.adapter.export_factors())

    def trained_vectors(self) -> dict[str, torch.Tensor] | None:
        return None if self.vectors is None else {k: v.cpu() for k, v in self.vectors.state_dict().items()}

    def close(self):
        if self.adapter is not None:
            self.adapter.detach()


def pivotal_embedding(job: PivotalJob, vectors: dict[str, torch.Tensor], family: FamilyLike, steps: int):
    """The trained pivotal embedding as a DojoEmbedding (what Save Embedding writes)."""
    from .ti_training import DojoEmbedding
    family = families.as_spec(family).family
    metadata = {"dojo_family": family.value, "dojo_embedding_name": job.name, "dojo_init_word": job.init_word,
                "dojo_num_vectors": str(job.num_vectors), "dojo_steps": str(steps), "dojo_pivotal": "true",
                "dojo_learning_rate": str(job.learning_rate), "dojo_train_fraction": str(job.train_fraction)}
    if job.trigger_word:
        metadata["dojo_trigger_word"] = job.trigger_word
    return DojoEmbedding(job.name, vectors, metadata)


@contextmanager
def text_encoder_session(job: TextEncoderJob | None, family: FamilyLike, adapter_config: AdapterConfig,
                         seed: int):
    """A `TextEncoderSession` for the run (None when the text encoder does not train), detached on exit."""
    if job is None:
        yield None
        return
    session = TextEncoderSession(job, family, adapter_config, seed)
    try:
        yield session
    finally:
        session.close()


class JointTrainable:
    """Several trainables (the diffusion model's adapter, the text encoder's, embedding vectors) as one for
    the loop and the checkpoints, each with its own learning rate and, optionally, a fraction of the
    steps after which it stops (its learning rate becomes 0)."""

    def __init__(self, parts: dict[str, tuple[object, float, float]]):
        self.parts = parts  # name -> (trainable, learning rate, fraction of steps it trains)

    def parameters(self) -> list[nn.Parameter]:
        return [p for trainable, _, _ in self.parts.values() for p in trainable.parameters()]

    def param_groups(self) -> list[dict]:
        return [{"params": list(t.parameters()), "lr": lr, "until": until} for t, lr, until in self.parts.values()]

    def let_autocast_cast_inputs(self, enabled: bool) -> None:
        for trainable, _, _ in self.parts.values():
            trainable.let_autocast_cast_inputs(enabled)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}/{k}": v for name, (t, _, _) in self.parts.items() for k, v in t.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, (t, _, _) in self.parts.items():
            t.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + "/")})
