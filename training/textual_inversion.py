"""Textual inversion in the engine: trainable vectors, caption templates, the model view, file layouts.

Textual inversion trains only a few new token vectors per text encoder ("clip_l" [n, 768], "clip_g"
[n, 1280]) while the text encoder and the denoiser stay frozen. The text encoder runs at every step
(the vectors go through it), so a training sample carries a reference to its caption instead of a
cached conditioning: `caption_sample` stores the caption index in `Conditioning.extra["caption"]`
and an empty context [1, chunks, 0] whose shape keeps captions of different token lengths out of
one batch. `TextualInversionModel.predict` turns those references into real conditionings with an
`encode(captions)` function the caller provides (the pack: ComfyUI's CLIP with the vectors spliced
into its token list), then asks the frozen model. The loop (`loop.train`) is used unchanged.
"""
from __future__ import annotations

import enum
from typing import Callable

import torch
from torch import nn

from .batches import Sample
from .protocol import Conditioning, DenoisingModel, TargetPreset

PLACEHOLDER = "{token}"
CAPTION_KEY = "caption"

# Hidden width of each text encoder an embedding file names (A1111 / ComfyUI keys).
ENCODER_WIDTHS = {"clip_l": 768, "clip_g": 1280}


class CaptionMode(str, enum.Enum):
    OBJECT = "object"
    STYLE = "style"
    CAPTIONS = "captions"


# The templates of the original textual-inversion code (Gal et al.), as diffusers' example ships them.
OBJECT_TEMPLATES = (
    "a photo of a {token}", "a rendering of a {token}", "a cropped photo of the {token}", "the photo of a {token}",
    "a photo of a clean {token}", "a photo of a dirty {token}", "a dark photo of the {token}",
    "a photo of my {token}", "a photo of the cool {token}", "a close-up photo of a {token}",
    "a bright photo of the {token}", "a cropped photo of a {token}", "a photo of the {token}",
    "a good photo of the {token}", "a photo of one {token}", "a close-up photo of the {token}",
    "a rendition of the {token}", "a photo of the clean {token}", "a rendition of a {token}",
    "a photo of a nice {token}", "a good photo of a {token}", "a photo of the nice {token}",
    "a photo of the small {token}", "a photo of the weird {token}", "a photo of the large {token}",
    "a photo of a cool {token}", "a photo of a small {token}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {token}", "a rendering in the style of {token}",
    "a cropped painting in the style of {token}", "the painting in the style of {token}",
    "a clean painting in the style of {token}", "a dirty painting in the style of {token}",
    "a dark painting in the style of {token}", "a picture in the style of {token}",
    "a cool painting in the style of {token}", "a close-up painting in the style of {token}",
    "a bright painting in the style of {token}", "a good painting in the style of {token}",
    "a close-up painting in the style of {token}", "a rendition in the style of {token}",
    "a nice painting in the style of {token}", "a small painting in the style of {token}",
    "a weird painting in the style of {token}", "a large painting in the style of {token}",
)


def token_caption(caption: str, token: str, trigger: str = "") -> str:
    """`caption` with `{token}` (or else the trigger word) replaced by `token`; a caption naming
    neither gets the token in front, so every training caption exercises the vectors."""
    spaced = f" {token} "
    if PLACEHOLDER in caption:
        out = caption.replace(PLACEHOLDER, spaced)
    elif trigger and trigger in caption:
        out = caption.replace(trigger, spaced)
    else:
        out = f"{token}, {caption}" if caption.strip() else token
    return " ".join(out.split())


def training_captions(mode: CaptionMode, captions: list[str], token: str, trigger: str = "") -> list[list[str]]:
    """For each item, the captions it trains with: its own caption (captions mode) or every template."""
    mode = CaptionMode(mode)
    if mode is CaptionMode.CAPTIONS:
        return [[token_caption(c, token, trigger)] for c in captions]
    templates = OBJECT_TEMPLATES if mode is CaptionMode.OBJECT else STYLE_TEMPLATES
    return [[token_caption(t, token) for t in templates] for _ in captions]


def caption_sample(latent: torch.Tensor, caption_index: int, chunks: int = 1) -> Sample:
    """A training sample whose conditioning is a reference to caption `caption_index` (see module doc)."""
    cond = Conditioning(torch.zeros(1, chunks, 0), None, {CAPTION_KEY: torch.tensor([caption_index])})
    return Sample(latent, cond)


def initial_vectors(rows: torch.Tensor, n: int) -> torch.Tensor:
    """n vectors from the init word's token rows [k, D]: repeated cyclically or truncated."""
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError("the init word has no tokens; give a word such as 'person', 'style' or '*'")
    index = torch.arange(n) % rows.shape[0]
    return rows.detach().to(torch.float32)[index].clone()


class EmbeddingVectors:
    """The trainable state: one fp32 parameter [n, D] per text encoder, with the adapter interface the
    loop and the checkpoints use (parameters / state_dict / load_state_dict)."""

    def __init__(self, vectors: dict[str, torch.Tensor]):
        if not vectors:
            raise ValueError("no text encoder to train vectors for")
        counts = {v.shape[0] for v in vectors.values()}
        if len(counts) != 1:
            raise ValueError(f"every encoder needs the same number of vectors (got {counts})")
        self.vectors = {k: nn.Parameter(v.detach().to(torch.float32).clone()) for k, v in vectors.items()}

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def parameters(self) -> list[nn.Parameter]:
        return [self.vectors[k] for k in sorted(self.vectors)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.vectors.items()}

    def let_autocast_cast_inputs(self, enabled: bool) -> None:
        """Part of the adapter interface; plain vectors have no layer inputs to cast."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.vectors):
            raise ValueError(f"embedding state has keys {sorted(state)}, expected {sorted(self.vectors)}")
        with torch.no_grad():
            for k, v in state.items():
                if v.shape != self.vectors[k].shape:
                    raise ValueError(f"embedding '{k}' has shape {tuple(v.shape)}, expected "
                                     f"{tuple(self.vectors[k].shape)}")
                self.vectors[k].copy_(v)


class TextualInversionModel:
    """A `DenoisingModel` whose conditioning is caption references: `encode(captions)` runs the text
    encoder (with the trainable vectors) and `base` predicts with the result."""

    def __init__(self, base: DenoisingModel, captions: list[str],
                 encode: Callable[[list[str]], Conditioning]):
        self.base, self.captions, self.encode = base, captions, encode
        self.family, self.schedule = base.family, base.schedule
        self.spec = getattr(base, "spec", None)   # the base view's family spec, for the memory planner

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        captions = [self.captions[i] for i in cond.extra[CAPTION_KEY].tolist()]
        real = self.encode(captions)
        return self.base.predict(noisy, t, real.to(noisy.device))

    def adaptable_modules(self, preset: TargetPreset) -> dict[str, nn.Module]:
        return {}


# --- files ------------------------------------------------------------------------------------------

def embedding_file_tensors(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout A1111 and ComfyUI read: SD1.5 = `emb_params` [n, 768]; SDXL = `clip_l` [n, 768] and
    `clip_g` [n, 1280], nothing else."""
    keys = set(vectors)
    if keys == {"clip_l"}:
        return {"emb_params": vectors["clip_l"].detach().cpu().contiguous()}
    if keys == {"clip_l", "clip_g"}:
        return {k: vectors[k].detach().cpu().contiguous() for k in ("clip_l", "clip_g")}
    raise ValueError(f"cannot write an embedding for encoders {sorted(keys)}")


BUNDLE_PREFIX = "bundle_emb"


def bundle_tensors(name: str, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An embedding inside a LoRA file, as A1111 reads it (extensions-builtin/Lora/networks.py, load_network:
    `bundle_emb.<name>.string_to_param.*` for SD1.5, `bundle_emb.<name>.clip_l` / `.clip_g` for SDXL)."""
    tensors = embedding_file_tensors(vectors)
    if set(tensors) == {"emb_params"}:
        return {f"{BUNDLE_PREFIX}.{name}.string_to_param.*": tensors["emb_params"]}
    return {f"{BUNDLE_PREFIX}.{name}.{k}": v for k, v in tensors.items()}


def split_bundle(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the LoRA's own tensors, {embedding name: vectors}) of a file that may bundle embeddings."""
    lora, bundled = {}, {}
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX + "."):
            _, name, rest = key.split(".", 2)
            bundled.setdefault(name, {})["clip_l" if rest.startswith("string_to_param") else rest] = value
        else:
            lora[key] = value
    return lora, bundled


def vectors_from_file(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read the layouts above (and A1111's `string_to_param` / a single tensor of width 768)."""
    if "clip_l" in tensors or "clip_g" in tensors:
        out = {k: tensors[k] for k in ("clip_l", "clip_g") if k in tensors}
    elif "emb_params" in tensors:
        out = {"clip_l": tensors["emb_params"]}
    else:
        found = [v for k, v in tensors.items() if k.startswith("string_to_param")] or \
            [v for v in tensors.values() if v.shape[-1] == ENCODER_WIDTHS["clip_l"]]
        if len(found) != 1:
            raise ValueError(f"not a textual-inversion embedding (keys: {sorted(tensors)[:5]})")
        out = {"clip_l": found[0]}
    for k, v in out.items():
        v = v.reshape(-1, v.shape[-1])
        if v.shape[-1] != ENCODER_WIDTHS[k]:
            raise ValueError(f"embedding '{k}' has width {v.shape[-1]}, expected {ENCODER_WIDTHS[k]}")
        out[k] = v.to(torch.float32)
    return out
