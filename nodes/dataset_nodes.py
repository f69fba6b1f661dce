"""Dojo's dataset nodes: load a folder of images / clips (the engine's `scan_folder`), and encode it
once with the graph's own VAE and text encoder into an `EncodedDataset` that training consumes.

Design decisions (see also the encode node's docstring):
- Folders come from ComfyUI's input directory or from folders the user registered as `dojo_datasets`
  in extra_model_paths.yaml (listed as "dojo_datasets/<name>"); anything resolving elsewhere is refused.
- Repeats (`N_name` folders) become N samples that share one latent tensor (no copy), so training
  sees them N times per epoch, as kohya does; each copy draws its own caption (see below).
- Captions are drawn once, for epoch 0 with the dataset seed: caption dropout and tag shuffling are
  applied at that moment and not varied per epoch after caching. Each repeated copy draws separately,
  so an item with N repeats gets N (possibly different) variants; every distinct caption is encoded once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..training.batches import Sample
from ..training.datasets import (BucketConfig, CaptionConfig, ClipConfig, ClipMode, Dataset, DatasetConfig,
                                 DatasetError, scan_folder)
from ..training.datasets.preview import caption_grid, tensor_to_pil
from ..training.distributed import current_data_parallel
from ..training.encode_cache import EncodeCache, caption_key, file_digest, latent_key, module_identity
from ..training.encoded import EncodedDataset
from ..training.protocol import Conditioning
from . import comfy_compat as cc
from .comfy_compat import io
from .failures import out_of_memory_as
from .paths import check_name_text
from .types import DatasetType, EncodedDatasetType

log = logging.getLogger(__name__)

DOJO_DATASET = DatasetType
DOJO_ENCODED_DATASET = EncodedDatasetType

ROOT_PREFIX = cc.DATASET_FOLDER_KEY + "/"
PREVIEW_ITEMS = 16
CACHE_DIR_NAME = "dojo_cache"
ENCODE_LOWER = ("the dataset's resolution / max_side (Dojo Load Image Dataset), the clip frame count for "
                "videos, or split the folder")

cc.register_dataset_folders()


# --- folders ---------------------------------------------------------------------------------------

def _subfolders(root: Path) -> list[str]:
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def dataset_folder_choices() -> list[str]:
    """Subfolders of ComfyUI's input directory, then "dojo_datasets/<name>" for each configured root."""
    choices = _subfolders(Path(cc.input_directory()))
    for root in cc.dataset_roots():
        choices += [ROOT_PREFIX + name for name in _subfolders(Path(root)) if ROOT_PREFIX + name not in choices]
    return choices


def resolve_dataset_folder(choice: str) -> Path:
    """The real folder for a `folder` choice, refusing anything outside the allowed roots."""
    allowed = "ComfyUI's input directory or a dojo_datasets folder from extra_model_paths.yaml"
    hint = (f"put the dataset folder in {cc.input_directory()} (or in a folder registered as "
            "'dojo_datasets' in extra_model_paths.yaml) and pick it from the list")
    text = (choice or "").strip()
    if not text:
        raise DatasetError(f"Dojo Load Image Dataset: no folder chosen; {hint}")
    try:
        check_name_text(text, "Dojo Load Image Dataset: folder")
    except ValueError as e:
        raise DatasetError(str(e)) from None
    pure = PurePosixPath(text.replace("\\", "/"))
    if pure.is_absolute() or os.path.isabs(text) or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise DatasetError(f"Dojo Load Image Dataset: folder '{choice}' is not a name inside {allowed}: "
                           f"absolute paths and '..' are refused; {hint}")
    if text.startswith(ROOT_PREFIX):
        rest = text[len(ROOT_PREFIX):]
        roots = [Path(r) for r in cc.dataset_roots()]
        candidates = [(root, root / rest) for root in roots]
        existing = [(root, path) for root, path in candidates if path.exists()]
        root, path = (existing or candidates or [(None, None)])[0]
        if root is None:
            raise DatasetError(f"Dojo Load Image Dataset: folder '{choice}' names the dojo_datasets folders, "
                               f"but none is configured; add 'dojo_datasets: /your/datasets' to "
                               "extra_model_paths.yaml or use a folder in the input directory")
    else:
        root = Path(cc.input_directory())
        path = root / text
    real_root, real = root.resolve(), path.resolve()
    if real == real_root:
        raise DatasetError(f"Dojo Load Image Dataset: folder '{choice}' names {allowed} itself, not a dataset "
                           f"folder inside it; {hint}")
    if not real.is_relative_to(real_root):
        raise DatasetError(f"Dojo Load Image Dataset: folder '{choice}' resolves to {real}, outside {allowed} "
                           f"({real_root}); a symlink may point out of it. Copy the files into the folder; {hint}")
    if not real.is_dir():
        raise DatasetError(f"Dojo Load Image Dataset: folder '{choice}' does not exist (looked at {real}); {hint}")
    return real


def folder_fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of everything one subfolder level deep: changes when a
    file or caption is added, removed or edited, so ComfyUI runs the node again."""
    h = hashlib.sha256()
    for base in [folder] + [p for p in sorted(folder.iterdir()) if p.is_dir()]:
        for entry in sorted(base.iterdir()):
            try:
                st = entry.stat()
            except OSError:
                continue
            h.update(f"{entry.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --- preview ---------------------------------------------------------------------------------------

def preview_text(dataset: Dataset) -> str:
    counts = dataset.bucket_counts()
    samples = sum(item.repeats for item in dataset.items)
    lines = [f"{len(dataset.items)} items ({samples} samples per epoch with repeats) from {dataset.root}",
             "buckets (h x w x frames): " + ", ".join(f"{h}x{w}x{t}: {n}" for (h, w, t), n in sorted(counts.items()))]
    if dataset.skipped:
        lines.append(f"skipped {len(dataset.skipped)} file(s):")
        lines += [f"  {path.name}: {reason}" for path, reason in dataset.skipped]
    other = [w for w in dataset.warnings if not w.startswith("skipped ")]
    if other:
        lines.append("warnings:")
        lines += [f"  {w}" for w in other]
    return "\n".join(lines)


def preview_sheet(dataset: Dataset, limit: int = PREVIEW_ITEMS) -> torch.Tensor:
    """The first `limit` items (first frame of a clip) with the caption their first copy is encoded
    with (epoch 0), as [1, H, W, 3]."""
    captions = epoch0_captions(dataset)
    entries = []
    for item, variants in zip(dataset.items[:limit], captions):
        frame = item.load()[0]
        label = variants[0]
        if item.is_clip:
            label = f"[{item.path.name}: frames {item.frame_indices[0]}-{item.frame_indices[-1]}] {label}"
        entries.append((tensor_to_pil(frame), label))
    sheet = caption_grid(entries)
    return torch.from_numpy(np.asarray(sheet, dtype=np.float32) / 255.0)[None]


class DojoLoadImageDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoLoadImageDataset",
            display_name="Dojo Load Image Dataset",
            category="Dojo/dataset",
            is_output_node=True,
            description="Scans a folder of images and/or video clips with .txt captions (kohya layout: "
                        "N_name subfolders repeat their files N times) into aspect-ratio buckets. "
                        "Shows a preview of the first items with their captions and lists skipped files.",
            inputs=[
                io.Combo.Input("folder", options=dataset_folder_choices(),
                               tooltip="The dataset folder: a subfolder of ComfyUI's input directory, or "
                                       "dojo_datasets/<name> for folders registered as 'dojo_datasets' in "
                                       "extra_model_paths.yaml. Refresh the page after adding a folder."),
                io.String.Input("trigger_word", default="",
                                tooltip="Word(s) put in front of every caption (or substituted where a caption "
                                        "says [trigger]); the caption of a file with no .txt."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Probability that a caption is replaced by the trigger word alone "
                                       "(drawn once when the dataset is encoded)."),
                io.Boolean.Input("shuffle_tags", default=False,
                                 tooltip="Shuffle comma-separated tags of each caption (once, when encoded)."),
                io.Int.Input("keep_tokens", default=0, min=0, max=64,
                             tooltip="How many leading tags stay in place when tags are shuffled."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                             tooltip="Training resolution: buckets have about resolution x resolution pixels."),
                io.Int.Input("bucket_step", default=64, min=8, max=256, step=8,
                             tooltip="Every bucket side is a multiple of this (64 suits SD, Flux and HunyuanVideo)."),
                io.Int.Input("min_side", default=256, min=8, max=8192, step=8,
                             tooltip="No bucket side is shorter than this."),
                io.Int.Input("max_side", default=1024, min=64, max=8192, step=8,
                             tooltip="No bucket side is longer than this (at least the resolution)."),
                io.Boolean.Input("no_upscale", default=False,
                                 tooltip="Keep images smaller than the resolution at about their own size "
                                         "instead of enlarging them."),
                io.Boolean.Input("random_crop", default=False,
                                 tooltip="Crop at a seeded random offset instead of the centre when the aspect "
                                         "ratio does not fit the bucket exactly."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=cc.SEED_CONTROL,
                             tooltip="Seed of random crops, caption dropout and tag shuffling."),
                io.Int.Input("frames_per_clip", default=1, min=1, max=1025,
                             tooltip="Frames per video clip. 1 = a dataset of still images (videos skipped). "
                                     "HunyuanVideo needs 4k+1 frames (5, 9, ... 33, 49...)."),
                io.Combo.Input("clip_mode", options=[m.value for m in ClipMode], default=ClipMode.HEAD.value,
                               tooltip="Where clips come from in each video: head = one clip from the start; "
                                       "uniform = clips_per_video clips spread evenly; sliding = a clip every "
                                       "'stride' frames."),
                io.Int.Input("clips_per_video", default=1, min=1, max=1000,
                             tooltip="Number of clips per video in uniform mode."),
                io.Int.Input("stride", default=0, min=0, max=10000,
                             tooltip="Frames between clip starts in sliding mode; 0 = the clip length "
                                     "(clips do not overlap)."),
                io.Float.Input("target_fps", default=0.0, min=0.0, max=240.0, step=0.5,
                               tooltip="Resample videos to this frame rate before cutting clips; 0 keeps the "
                                       "source rate."),
            ],
            outputs=[
                DOJO_DATASET.Output(display_name="dataset",
                                    tooltip="The scanned dataset, for Dojo Encode Dataset."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, **kwargs):
        try:
            return folder_fingerprint(resolve_dataset_folder(folder))
        except (DatasetError, OSError):
            return float("nan")  # never equal: run again and report the problem

    @classmethod
    def execute(cls, folder, trigger_word="", caption_dropout=0.0, shuffle_tags=False, keep_tokens=0,
                resolution=512, bucket_step=64, min_side=256, max_side=1024, no_upscale=False, random_crop=False,
                seed=0, frames_per_clip=1, clip_mode="head", clips_per_video=1, stride=0,
                target_fps=0.0) -> io.NodeOutput:
        path = resolve_dataset_folder(folder)
        config = DatasetConfig(
            captions=CaptionConfig(trigger=trigger_word, dropout=caption_dropout, shuffle=shuffle_tags,
                                   keep_tokens=keep_tokens),
            buckets=BucketConfig(resolution=resolution, step=bucket_step, min_side=min_side, max_side=max_side,
                                 no_upscale=no_upscale, random_crop=random_crop),
            clips=ClipConfig(frames=frames_per_clip, mode=clip_mode, clips_per_video=clips_per_video,
                             stride=stride or None, fps=target_fps or None),
            seed=seed,
        )
        dataset = scan_folder(path, config)
        text = preview_text(dataset)
        return io.NodeOutput(dataset, ui=cc.preview_ui(preview_sheet(dataset), text))


# --- encoding --------------------------------------------------------------------------------------

def epoch0_captions(dataset: Dataset) -> list[list[str]]:
    """For each item, one caption per repeat, drawn in item order from the epoch-0 generator."""
    rng: random.Random = dataset.epoch_rng(0)
    return [[item.caption(dataset.config.captions, rng) for _ in range(item.repeats)] for item in dataset.items]


def to_conditioning(cond: torch.Tensor, info: dict) -> Conditioning:
    """CLIP output -> Conditioning: cond is the context, pooled_output the pooled vector, other tensors
    and numbers go to `extra` (e.g. attention_mask); anything else (hooks, ...) is left out."""
    extra = {}
    for name, value in info.items():
        if name == "pooled_output":
            continue
        if torch.is_tensor(value):
            extra[name] = value.detach().cpu()
        elif isinstance(value, (bool, int, float)):
            extra[name] = value
    pooled = info.get("pooled_output")
    return Conditioning(cond.detach().cpu(), None if pooled is None else pooled.detach().cpu(), extra)


def _ordinary(x):
    """An ordinary (non-inference) CPU tensor copy, so training can use it with autograd."""
    return x.detach().to("cpu").clone() if torch.is_tensor(x) else x


def encode_latents(dataset: Dataset, vae, cache: EncodeCache | None = None, progress=None,
                   stats: dict | None = None) -> list[torch.Tensor]:
    """Every item's latent (as the VAE returns it, without batch dimension), from `cache` where its key
    matches; counts go to `stats` ("latents_encoded", "latents_cached"). Shared by Dojo Encode Dataset
    and the textual-inversion trainer (which encodes latents only: its captions go through the CLIP
    at every step)."""
    stats = stats if stats is not None else {}
    stats.setdefault("latents_encoded", 0)
    stats.setdefault("latents_cached", 0)
    time_factor = cc.vae_time_factor(vae)
    vae_id = None
    if cache is not None:
        vae_id = module_identity(cc.vae_weights(vae), {"class": type(vae.first_stage_model).__name__})
    digests: dict[Path, str] = {}
    latents = []
    for item in dataset.items:
        t = item.bucket[2]
        if t > 1 and time_factor is None:
            raise DatasetError(f"{item.path.name}: clips of {t} frames need a video VAE, but this VAE encodes "
                               "still images; set frames_per_clip to 1 or load the model's video VAE")
        if time_factor and (t - 1) % time_factor:
            raise DatasetError(f"{item.path.name}: clips of {t} frames do not fit this video VAE, which packs "
                               f"{time_factor} frames into one latent after the first: use {time_factor}k+1 "
                               f"frames per clip (e.g. {((t - 1) // time_factor) * time_factor + 1} or "
                               f"{((t - 1) // time_factor + 1) * time_factor + 1})")
        latent = key = None
        if cache is not None:
            if item.path not in digests:
                digests[item.path] = file_digest(item.path)
            geometry = {"bucket": item.bucket, "resize_to": item.resize_to, "crop": item.crop,
                        "frames": item.frame_indices}
            key = latent_key(digests[item.path], geometry, vae_id)
            latent = cache.get_latent(key)
        if latent is None:
            pixels = item.load()  # [T, C, H, W] in [-1, 1]
            frames = ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
            latent = cc.vae_encode(vae, frames)[0].detach().cpu()
            stats["latents_encoded"] += 1
            if cache is not None:
                cache.put_latent(key, latent, str(item.path))
        else:
            stats["latents_cached"] += 1
        latents.append(latent)
        if progress is not None:
            progress.update(1)
    if cache is not None:
        cache.flush()
    return latents


def encode_once(encode, cache_to_disk: bool):
    """`encode(cache)` with the disk cache in <output>/dojo_cache when `cache_to_disk`; returns the result
    and the cache (None without one; its `warning` says when it fell back to memory). In a data-parallel
    run the dataset is encoded once: rank 0 encodes into the cache (always on there) and the other
    ranks read it once rank 0 is done."""
    root = Path(cc.output_directory()) / CACHE_DIR_NAME
    parallel = current_data_parallel()
    if parallel is None:
        cache = EncodeCache(root) if cache_to_disk else None
        return encode(cache), cache
    if not parallel.is_main:
        parallel.barrier("rank 0 encoding the dataset")
    cache = EncodeCache(root)
    result = encode(cache)
    if parallel.is_main:
        parallel.barrier("the other ranks reading the encoded dataset")
    return result, cache


def encode_dataset(dataset: Dataset, vae, clip, cache: EncodeCache | None = None,
                   progress=None) -> EncodedDataset:
    """Encode every item's pixels with `vae` and every distinct caption with `clip` (see the module
    docstring for captions and repeats). With `cache`, entries whose key matches are read instead of
    encoded; counts land in `EncodedDataset.info`."""
    captions = epoch0_captions(dataset)
    unique = list(dict.fromkeys(c for per_item in captions for c in per_item))
    clip_id = None
    if cache is not None:
        clip_id = module_identity(cc.clip_weights(clip), cc.clip_settings(clip))
    stats = {"latents_encoded": 0, "latents_cached": 0, "captions_encoded": 0, "captions_cached": 0}

    conds: dict[str, Conditioning] = {}
    for caption in unique:
        key = caption_key(caption, clip_id) if cache is not None else None
        cond = cache.get_cond(key) if cache is not None else None
        if cond is None:
            cond = to_conditioning(*cc.clip_encode(clip, caption))
            stats["captions_encoded"] += 1
            if cache is not None:
                cache.put_cond(key, cond, caption)
        else:
            stats["captions_cached"] += 1
        conds[caption] = cond
        if progress is not None:
            progress.update(1)

    latents = encode_latents(dataset, vae, cache, progress, stats)

    samples, flat_captions = [], []
    with torch.inference_mode(False):
        ordinary_conds = {c: Conditioning(_ordinary(v.context), _ordinary(v.pooled),
                                          {k: _ordinary(x) for k, x in v.extra.items()}) for c, v in conds.items()}
        for latent, per_item in zip(latents, captions):
            latent = _ordinary(latent)
            for caption in per_item:  # repeats share one latent tensor
                samples.append(Sample(latent, ordinary_conds[caption]))
                flat_captions.append(caption)
    info = {**stats, "items": len(dataset.items), "samples": len(samples), "unique_captions": len(unique),
            # Only the folder's name: this travels into LoRA metadata, which must hold no absolute paths.
            "source": dataset.root.name, "trigger_word": dataset.config.captions.trigger}
    return EncodedDataset(samples, flat_captions, info=info)


def encode_summary(encoded: EncodedDataset) -> str:
    i = encoded.info
    shapes = sorted({tuple(s.latent.shape) for s in encoded.samples})
    return (f"{i['samples']} samples from {i['items']} items; latents: {i['latents_encoded']} encoded, "
            f"{i['latents_cached']} from cache; captions: {i['unique_captions']} distinct, "
            f"{i['captions_encoded']} encoded, {i['captions_cached']} from cache; latent shapes: "
            + ", ".join("x".join(map(str, s)) for s in shapes))


class DojoEncodeDataset(io.ComfyNode):
    """Encodes a dataset once with the graph's VAE and CLIP; training then makes no VAE or CLIP call.

    Captions are fixed at encode time (epoch 0, dataset seed): dropout and tag shuffling are not
    varied per epoch afterwards; each repeat of an item draws its own variant. Latents are kept as the
    VAE returns them, without batch dimension (the trainer applies the model's process_latent_in).
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoEncodeDataset",
            display_name="Dojo Encode Dataset",
            category="Dojo/dataset",
            is_output_node=True,
            description="Encodes a Dojo dataset once: pixels with the VAE, each distinct caption with the "
                        "text encoder. With cache_to_disk, results are kept in the output folder under "
                        "dojo_cache/ and reused while files, captions and encoders are unchanged.",
            inputs=[
                DOJO_DATASET.Input("dataset", tooltip="The dataset from Dojo Load Image Dataset."),
                io.Vae.Input("vae", tooltip="The VAE of the model you will train (its latents are cached)."),
                io.Clip.Input("clip", tooltip="The text encoder of the model you will train (captions are "
                                              "encoded with it, clip skip and any applied LoRA included)."),
                io.Boolean.Input("cache_to_disk", default=False, optional=True,
                                 tooltip="Keep latents and text encodings in <output>/dojo_cache (safetensors + "
                                         "index.json) and reuse them in later runs; edited files or captions "
                                         "and other encoders are encoded again."),
            ],
            outputs=[
                DOJO_ENCODED_DATASET.Output(display_name="encoded_dataset",
                                            tooltip="Latents and conditionings, ready for Dojo training nodes."),
            ],
        )

    @classmethod
    def execute(cls, dataset, vae, clip, cache_to_disk=False) -> io.NodeOutput:
        if vae is None or clip is None:
            raise ValueError("Dojo Encode Dataset needs both a VAE and a CLIP; the loader gave none for "
                             f"{'vae' if vae is None else 'clip'} (does the checkpoint contain one?)")
        captions = len({c for per_item in epoch0_captions(dataset) for c in per_item})
        progress = cc.progress_bar(len(dataset.items) + captions)
        with out_of_memory_as("encoding the dataset with the VAE and text encoder", ENCODE_LOWER):
            encoded, cache = encode_once(lambda cache: encode_dataset(dataset, vae, clip, cache, progress), cache_to_disk)
        text = encode_summary(encoded)
        if cache is not None and cache.warning:
            text += f"\nwarning: {cache.warning}"
        log.info("Dojo Encode Dataset: %s", text)
        return io.NodeOutput(encoded, ui={"text": [text]})
