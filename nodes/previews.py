"""Sample previews while training: every `every` steps (and before the first step and after the last)
the model being trained is sampled with ComfyUI's own sampler (the KSampler path), at a fixed seed so
the frames of a run are comparable, then saved as samples/step_NNNNNN.png (.webp for video) in the
run's checkpoint folder and shown live on the training node.

A preview must not change training: the same seed gives the bit-identical LoRA with previews on and
off. `isolated_sampling` is where that is kept: no autograd (nothing saved, so the gradient
protection's copy-on-write registry stays empty and its checkpoint wrappers pass straight through),
the global RNG forked (ComfyUI seeds sampling noise through it), every module's train/eval flag and the
patcher's model_options put back, and the model made resident again (decoding loads the VAE, which
may evict the model from the GPU). The adapter is left as it is: the preview shows the LoRA at
strength 1 as it stands. Sampling runs inside the training region on purpose: with block swap the
model does not fit on the device without it, for sampling as for training.

An interrupt (ComfyUI's Cancel) raised from inside a preview's forward propagates exactly as one
raised from inside a training step's forward: out of the loop's step callback, with every state above
restored on the way out.
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..training.families import FamilySpec
from ..training.files import next_free_path
from ..training.image_grid import captioned, fit, preview_strip, save_image_new, stack, to_pil
from . import comfy_compat as cc
from .comfy_compat import io

log = logging.getLogger("comfyui-dojo")
SAMPLES_FOLDER = "samples"
# Every 250 steps: at the bundled workflows' settings a 20-step preview costs 2-7% of training time
# (bench/bench_preview_cost.py); see PreviewSettings.auto_cfg for the guidance scale.
DEFAULT_SAMPLE_EVERY = 250
LIVE_SIDE = 512  # the live preview's longer side, in pixels


@dataclass(frozen=True)
class PreviewSettings:
    every: int = DEFAULT_SAMPLE_EVERY    # 0 = off
    steps: int = 20
    cfg: float = 0.0                     # 0 = the family's usual scale (its spec's sample_cfg)
    seed: int = 0
    width: int = 512
    height: int = 512
    frames: int = 17                     # video families only
    sampler: str = "euler"
    scheduler: str = "simple"

    def cfg_for(self, spec: FamilySpec) -> float:
        """SD models sample with classifier-free guidance; guidance-distilled ones (Flux, HunyuanVideo: their
        guidance rides in the conditioning) at cfg 1, which also skips the negative pass."""
        return self.cfg or spec.sample_cfg

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0


@dataclass
class PreviewRequest:
    """What a Train node asks for: settings, a VAE to decode with, and the prompt as CONDITIONING pairs,
    or as a function returning them at sampling time (textual inversion re-encodes its prompt with the
    vectors as they stand)."""
    settings: PreviewSettings
    vae: object
    positive: list | Callable[[], list]
    negative: list | Callable[[], list] | None = None


def _conditioning(value):
    return value() if callable(value) else value


@contextmanager
def isolated_sampling(patcher):
    """Sampling that leaves no trace on training (see the module docstring)."""
    device = cc.compute_device(patcher)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    modules = list(patcher.model.modules())
    modes = [m.training for m in modules]
    options = patcher.model_options
    saved_options = {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in options.items()}
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            yield
    finally:
        for module, mode in zip(modules, modes):
            module.training = mode
        patcher.model_options = options
        options.clear()
        options.update(saved_options)
        cc.load_for_compute(patcher)


@dataclass
class Sample:
    step: int
    frames: list          # PIL images
    path: Path | None


@dataclass
class TrainingPreviews:
    """The previews of one run: call `at(step, loss)` at the steps `due` names."""
    request: PreviewRequest
    patcher: object
    spec: FamilySpec                   # the model view's family spec
    progress: object                   # nodes.progress.TrainingProgress
    folder: Path | None                # the run's checkpoint folder (None: nothing saved)
    samples: list[Sample] = field(default_factory=list)

    @property
    def video(self) -> bool:
        return self.spec.video

    def due(self, step: int) -> bool:
        return self.request.settings.due(step) and not any(s.step == step for s in self.samples)

    def on_step(self, step: int, loss: float, lr: float) -> None:
        """The loop's per-step callback: progress first, then a preview if one is due."""
        self.progress.on_step(step, loss, lr)
        if self.due(step) and not self.progress.should_stop():
            self.at(step, loss)

    def at_start(self, step: int) -> None:
        if self.request.settings.every > 0 and not self.progress.should_stop():
            self.at(step, None)

    def at_end(self, step: int, loss: float | None) -> None:
        if self.request.settings.every > 0 and not any(s.step == step for s in self.samples):
            self.at(step, loss)

    def at(self, step: int, loss: float | None) -> Sample:
        s = self.request.settings
        with isolated_sampling(self.patcher):
            latent = cc.empty_latent(self.patcher, s.width, s.height, s.frames if self.video else 1, self.spec)
            positive = _conditioning(self.request.positive)
            negative = _conditioning(self.request.negative) if self.request.negative is not None else None
            if negative is None:
                negative = zero_conditioning(positive)
            samples = cc.ksample(self.patcher, positive, negative, latent, s.seed, s.steps, s.cfg_for(self.spec),
                                 s.sampler, s.scheduler)
            images = cc.vae_decode(self.request.vae, samples).float().cpu()
        frames = [to_pil(f.numpy()) for f in images]
        sample = Sample(step, frames, self._save(step, frames))
        self.samples.append(sample)
        self._show(sample, loss)
        return sample

    def _save(self, step: int, frames: list) -> Path | None:
        if self.folder is None:
            return None
        folder = self.folder / SAMPLES_FOLDER
        suffix = ".webp" if len(frames) > 1 else ".png"
        path = folder / f"step_{step:06d}{suffix}"
        if path.exists():  # a resumed run samples its first step again: keep both
            path = next_free_path(folder, path.stem, suffix)
        return save_image_new(path, frames)

    def _show(self, sample: Sample, loss: float | None) -> None:
        total = self.progress.total
        label = f"step {sample.step}/{total}" + (f"  loss {loss:.4f}" if loss is not None else "  (before training)")
        self.progress.show_sample(sample.step, captioned(fit(sample.frames[0], LIVE_SIDE), label))
        if sample.path is not None:
            entry = served_entry(sample.path)
            if entry is not None:
                cc.show_node_images([entry], animated=len(sample.frames) > 1)


def zero_conditioning(positive: list) -> list:
    """ConditioningZeroOut of the positive prompt: the negative when none is connected."""
    out = []
    for cond, extra in positive:
        extra = dict(extra)
        if torch.is_tensor(extra.get("pooled_output")):
            extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
        out.append([torch.zeros_like(cond), extra])
    return out


def served_entry(path: Path) -> dict | None:
    """How ComfyUI's /view serves a file under the output folder: {filename, subfolder, type}."""
    root = Path(cc.output_directory()).resolve()
    try:
        relative = path.resolve().relative_to(root)
    except ValueError:
        return None
    return {"filename": relative.name, "subfolder": str(relative.parent) if relative.parent != Path(".") else "",
            "type": "output"}


def samples_strip(samples: list[Sample], width: int):
    """The run's previews as labelled thumbnails (first frame of a video) for under the loss curve."""
    return preview_strip([(f"step {s.step}", s.frames[0]) for s in samples], width)


def with_samples(loss_graph, samples: list[Sample]):
    """The loss curve with the run's previews as a strip underneath (the curve alone without previews)."""
    if not samples:
        return loss_graph
    return stack([loss_graph, samples_strip(samples, loss_graph.width)])


# --- the Train nodes' preview inputs (optional, at the end of their input lists) ----------------------

def sample_widgets(video_note: bool = True) -> list:
    """The preview widgets both Train nodes share."""
    return [
        io.Int.Input("sample_every", default=DEFAULT_SAMPLE_EVERY, min=0, max=1_000_000, optional=True,
                     tooltip="Preview every N steps (and before the first and after the last step) once a preview "
                             "prompt is given; 0 = off. 250 keeps previews under 10% of training time with the "
                             "other defaults. Saved as samples/step_NNNNNN.png in the run's checkpoint folder."),
        io.Int.Input("sample_steps", default=20, min=1, max=200, optional=True,
                     tooltip="Sampler steps per preview (euler, simple schedule)."),
        io.Float.Input("sample_cfg", default=0.0, min=0.0, max=30.0, step=0.1, optional=True,
                       tooltip="CFG scale of the previews. 0 = the family's usual: 7 for SD1.5 / SDXL, 1 for the "
                               "guidance-distilled Flux and HunyuanVideo (their guidance rides in the conditioning)."),
        io.Int.Input("sample_seed", default=0, min=0, max=2**63 - 1, optional=True,
                     tooltip="Noise seed of every preview: fixed, so the previews of a run are comparable. "
                             "Previews never change the training (the same LoRA with previews on or off)."),
        io.Int.Input("sample_width", default=512, min=16, max=4096, step=16, optional=True,
                     tooltip="Preview width in pixels."),
        io.Int.Input("sample_height", default=512, min=16, max=4096, step=16, optional=True,
                     tooltip="Preview height in pixels."),
        io.Int.Input("sample_frames", default=17, min=1, max=257, step=4, optional=True,
                     tooltip="Frames of a video preview (HunyuanVideo: 4k+1; shown animated and saved as .webp); "
                             "ignored for image models."),
    ]


def preview_settings(sample_every: int = DEFAULT_SAMPLE_EVERY, sample_steps: int = 20, sample_cfg: float = 0.0,
                     sample_seed: int = 0, sample_width: int = 512, sample_height: int = 512,
                     sample_frames: int = 17) -> PreviewSettings:
    """The widgets' values (ComfyUI passes no value for an optional widget a prompt leaves out)."""
    return PreviewSettings(every=sample_every, steps=sample_steps, cfg=sample_cfg, seed=sample_seed,
                           width=sample_width, height=sample_height, frames=sample_frames)


def lora_preview_request(positive, negative, vae, **widgets) -> PreviewRequest | None:
    """Train LoRA's previews: None (off) without a preview prompt or with sample_every 0."""
    settings = preview_settings(**widgets)
    if positive is None or settings.every == 0:
        return None
    if vae is None:
        raise ValueError("preview_positive is connected but preview_vae is not: connect the VAE that decodes "
                         "this model's latents (or disconnect preview_positive to train without previews)")
    return PreviewRequest(settings, vae, positive, negative)


def embedding_prompt(prompt: str, name: str) -> str:
    """The preview prompt with the embedding in it: {token} becomes embedding:<name>; a prompt naming
    neither gets it in front."""
    word = f"embedding:{name}"
    if "{token}" in prompt:
        return prompt.replace("{token}", word)
    return prompt if word in prompt else f"{word} {prompt}".strip()
