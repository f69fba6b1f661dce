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
from dataclasses import dataclass

import torch
from torch import nn

from ..training.adapters import AdapterConfig, attach_adapter
from ..training.grad_safety import copy_on_write_saved_tensors
from ..training.lora_formats import kohya_keys
from ..training.protocol import Family, select_linears
from ..training.textual_inversion import TextualInversionModel, caption_sample
from . import comfy_compat as cc

# kohya's prefixes per text encoder, which ComfyUI's model_lora_keys_clip maps (lora_te_ for SD1.5's only
# encoder; SDXL's and Flux's CLIP-L is te1, SDXL's CLIP-G te2).
TE_PREFIXES = {Family.SD15: {"clip_l": "lora_te_"}, Family.SDXL: {"clip_l": "lora_te1_", "clip_g": "lora_te2_"},
               Family.FLUX: {"clip_l": "lora_te1_"}}
_LAYERS = r"^{enc}\.transformer\.text_model\.encoder\.layers\.\d+\."


class TeTargets(str, enum.Enum):
    ATTENTION = "attention"
    ATTENTION_MLP = "attention_mlp"


_TARGET_PATTERNS = {TeTargets.ATTENTION: r"self_attn\.(q|k|v|out)_proj$",
                    TeTargets.ATTENTION_MLP: r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"}


@dataclass
class TextEncoderJob:
    clip: object                         # ComfyUI CLIP of the same checkpoint as the MODEL
    learning_rate: float
    targets: TeTargets = TeTargets.ATTENTION_MLP


def text_encoder_job(clip, learning_rate: float, targets: str) -> TextEncoderJob | None:
    """The node's inputs as a job; None when the text encoder does not train (learning rate 0)."""
    if not learning_rate:
        return None
    if clip is None:
        raise ValueError(f"text_encoder_lr is {learning_rate} but no CLIP is connected: connect the checkpoint's "
                         "CLIP to Train LoRA's clip input, or set text_encoder_lr to 0")
    return TextEncoderJob(clip, float(learning_rate), TeTargets(targets))


def te_modules(clip, family: Family, targets: TeTargets) -> dict[str, nn.Module]:
    """The text-transformer linears to adapt, by module name inside `clip.cond_stage_model`."""
    family = Family(family)
    if family not in TE_PREFIXES:
        raise ValueError(f"text-encoder LoRA supports SD1.5, SDXL and Flux (CLIP-L); this MODEL is {family.value}")
    root = clip.cond_stage_model
    found = {}
    for enc in TE_PREFIXES[family]:
        found.update(select_linears(root, _LAYERS.format(enc=enc) + r".*" + _TARGET_PATTERNS[TeTargets(targets)]))
    if not found:
        raise ValueError(f"the CLIP has no {'/'.join(TE_PREFIXES[family])} text transformer layers: connect the "
                         f"CLIP of the same checkpoint as the MODEL ({family.value})")
    return found


def te_lora_keys(family: Family, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """kohya's layout: `<prefix>text_model_encoder_layers_<i>_<module>.lora_down/up.weight` + `.alpha`."""
    out = {}
    for name, pair in factors.items():
        enc, _, inner = name.partition(".transformer.")
        out.update(kohya_keys({inner: pair}, TE_PREFIXES[Family(family)][enc]))
    return out


class TextEncoderSession:
    """The text encoder's LoRA during a run: a training clone of the CLIP with the layers attached, the
    tokens of each caption, and the model view that encodes a batch's captions each step."""

    def __init__(self, job: TextEncoderJob, family: Family, adapter_config: AdapterConfig, seed: int):
        self.job, self.family = job, Family(family)
        self.clip = cc.clip_with_embeddings(job.clip, {}, for_training=True)
        cc.prepare_clip_for_training(self.clip)
        self.adapter = attach_adapter(self.clip.cond_stage_model, te_modules(self.clip, family, job.targets),
                                      adapter_config, seed=seed + 1)
        self.tokens: dict[str, dict] = {}

    def conditioned_samples(self, samples, captions: list[str]):
        """Samples whose conditioning is a reference to their caption (the cached conditioning is not used:
        the text encoder changes every step), and the distinct captions in reference order."""
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
        return te_lora_keys(self.family, self.adapter.export_factors())

    def close(self):
        self.adapter.detach()


@contextmanager
def text_encoder_session(job: TextEncoderJob | None, family: Family, adapter_config: AdapterConfig, seed: int):
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

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}/{k}": v for name, (t, _, _) in self.parts.items() for k, v in t.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, (t, _, _) in self.parts.items():
            t.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + "/")})
