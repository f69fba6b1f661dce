"""The metadata keys other tools read from an adapter file: kohya's `ss_*` / `sshs_*` keys (kohya's
viewers, A1111 / Forge, Civitai's uploader) and the safetensors ModelSpec `modelspec.*` keys.

Values follow what the trainers that defined them write: kohya sd-scripts (`train_network.py`,
`library/sai_model_spec.py`, `library/train_util.py`) for SD1.5, SDXL and Flux, musubi-tuner for
HunyuanVideo. Pure logic, no ComfyUI import.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections import Counter

import torch

from .families import FamilyLike, as_spec
from .families.sdxl import IMPL_STABILITY_AI

# Per family (its spec's `metadata`, training/families): kohya's ss_base_model_version (A1111 and Forge
# decide a LoRA's base model from it: network.py detect_version, "sdxl_" prefix -> SDXL), the ModelSpec
# architecture id and LoRA implementation, kohya's `--network_module`, and the default resolution.
MODELSPEC_VERSION = "1.0.1"
_PREDICTION_TYPE = {"eps": "epsilon", "v": "v"}  # Dojo's Prediction values -> ModelSpec's
KIND_LORA = "lora"
KIND_EMBEDDING = "textual-inversion"


def tag_frequency(captions: list[str], dataset_name: str = "dataset") -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: {dataset: {tag: count}}, tags being a caption's comma-separated parts."""
    counts: Counter = Counter()
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip()
            if tag:
                counts[tag] += 1
    return {dataset_name or "dataset": dict(counts)}


def latent_resolution(latent_shapes: list[tuple[int, ...]], scale: int = 8) -> tuple[int, int] | None:
    """(width, height) in pixels of the largest training latent (what kohya records as the resolution)."""
    if not latent_shapes:
        return None
    h, w = max((s[-2], s[-1]) for s in latent_shapes if len(s) >= 2)
    return w * scale, h * scale


def training_keys(family: FamilyLike, *, resolution: tuple[int, int] | None, captions: list[str] | None = None,
                  dataset_name: str = "", text_encoder_lr: float | None = None, unet_lr: float | None = None,
                  clip_skip: int | None = None) -> dict[str, str]:
    """kohya's ss_* keys that describe the training: base model, network module, resolution, tags."""
    meta = as_spec(family).metadata
    w, h = resolution or meta.default_resolution
    out = {"ss_base_model_version": meta.base_model_version, "ss_network_module": meta.network_module,
           "ss_v2": "False", "ss_resolution": f"({w}, {h})"}
    if captions:
        out["ss_tag_frequency"] = json.dumps(tag_frequency(captions, dataset_name))
    if text_encoder_lr is not None:
        out["ss_text_encoder_lr"] = str(text_encoder_lr)
    if unet_lr is not None:
        out["ss_unet_lr"] = str(unet_lr)
    if clip_skip is not None:
        out["ss_clip_skip"] = str(clip_skip)
    return out


def modelspec_keys(family: FamilyLike, *, kind: str = KIND_LORA, title: str, resolution: tuple[int, int] | None,
                   timestamp: float, trigger_phrase: str | None = None, prediction: str | None = None,
                   description: str | None = None) -> dict[str, str]:
    """ModelSpec 1.0.1 keys (architecture `<id>/lora` or `<id>/textual-inversion`, implementation,
    title, resolution `WxH`, ISO-8601 date, trigger phrase, prediction type for SD)."""
    meta = as_spec(family).metadata
    w, h = resolution or meta.default_resolution
    # kohya: textual inversion is always the SAI implementation; a LoRA is SAI for SDXL, diffusers for SD1.
    implementation = IMPL_STABILITY_AI if kind == KIND_EMBEDDING else meta.implementation
    out = {"modelspec.sai_model_spec": MODELSPEC_VERSION, "modelspec.architecture": f"{meta.architecture}/{kind}",
           "modelspec.implementation": implementation, "modelspec.title": title,
           "modelspec.resolution": f"{w}x{h}",
           "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat()}
    if trigger_phrase:
        out["modelspec.trigger_phrase"] = trigger_phrase
    if prediction and meta.records_prediction:
        out["modelspec.prediction_type"] = _PREDICTION_TYPE.get(prediction, prediction)
    if description:
        out["modelspec.description"] = description
    return out


def lora_file_keys(family: FamilyLike, *, resolution: tuple[int, int] | None, captions: list[str] | None = None,
                   dataset_name: str = "", unet_lr: float | None = None, text_encoder_lr: float | None = None,
                   prediction: str | None = None, trigger_phrase: str | None = None,
                   timestamp: float | None = None) -> dict[str, str]:
    """The ss_* and modelspec.* keys a trained LoRA carries; the save node adds the file's own
    (`for_file`: output name, title, hashes)."""
    timestamp = time.time() if timestamp is None else timestamp
    return {**training_keys(family, resolution=resolution, captions=captions, dataset_name=dataset_name,
                            unet_lr=unet_lr, text_encoder_lr=text_encoder_lr),
            "ss_training_started_at": str(timestamp),
            **modelspec_keys(family, kind=KIND_LORA, title=f"LoRA@{timestamp}", resolution=resolution,
                             timestamp=timestamp, trigger_phrase=trigger_phrase, prediction=prediction)}


def embedding_file_keys(family: FamilyLike, *, name: str, resolution: tuple[int, int] | None = None,
                        timestamp: float | None = None) -> dict[str, str]:
    """The base-model keys an embedding file carries: kohya's ss_base_model_version (A1111 reads it for
    embeddings as for LoRAs) and the ModelSpec textual-inversion keys, the prompt name as trigger phrase."""
    timestamp = time.time() if timestamp is None else timestamp
    meta = as_spec(family).metadata
    w, h = resolution or meta.default_resolution
    return {"ss_base_model_version": meta.base_model_version, "ss_v2": "False", "ss_output_name": name,
            "ss_resolution": f"({w}, {h})",
            **modelspec_keys(family, kind=KIND_EMBEDDING, title=name, resolution=resolution, timestamp=timestamp,
                             trigger_phrase=name)}


def for_file(metadata: dict[str, str], tensors: dict[str, torch.Tensor], output_name: str,
             trigger_phrase: str | None = None) -> dict[str, str]:
    """The keys that depend on the saved file: ss_output_name and modelspec.title (the file's name, which
    A1111 shows as the LoRA's alias), the trigger phrase, and kohya's two hashes of the tensors as saved."""
    out = {**metadata, "ss_output_name": output_name, "modelspec.title": output_name}
    if trigger_phrase:
        out["modelspec.trigger_phrase"] = trigger_phrase
    return with_hashes(tensors, out)


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya computes them (train_util.precalculate_safetensors_hashes):
    the file serialised with only its ss_* metadata; the model hash is the SHA-256 of the tensor bytes after
    the header, the legacy hash the first 8 hex digits of the SHA-256 of bytes 0x100000..0x110000."""
    import safetensors.torch
    data = safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                  {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    model_hash, legacy_hash = safetensors_hashes(tensors, metadata)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
