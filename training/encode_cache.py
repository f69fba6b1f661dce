"""A disk cache of encoded latents and text conditionings: safetensors files plus a JSON index.

Never pickle. Two kinds of entries, each keyed by a content hash:
- a latent: hash of the media file's bytes, how the item was cut from it (bucket, resize, crop,
  frames) and the VAE's identity;
- a conditioning: hash of the caption text and the text encoder's identity.
Keeping the two apart means an edited caption re-encodes only its text, and an edited image only its
latent. An entry is used only when its key matches exactly, so a changed file, caption or encoder
never meets a stale tensor. The index (`index.json`) records what each file holds; a file missing
from disk or from the index is a miss.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from .files import DiskFullError, clean_stale_temporaries, file_mode, is_disk_full, safetensors_size, temp_prefix
from .protocol import Conditioning

log = logging.getLogger("comfyui-dojo")

INDEX_NAME = "index.json"
INDEX_VERSION = 1


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _hash_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def module_identity(named_tensors: Iterable[tuple[str, torch.Tensor]], extra=None, sample: int = 16) -> str:
    """A cheap identity of a set of weights: every name, shape and dtype, plus the first `sample`
    values of each tensor, plus `extra` (settings that change outputs, e.g. a CLIP's layer).

    Two different checkpoints of one architecture differ in their sampled values; reading a few
    values per tensor costs nothing next to hashing whole weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda kv: kv[0]):
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        if tensor.numel() and tensor.device.type != "meta":
            values = tensor.detach().reshape(-1)[:sample].to("cpu", torch.float32)
            h.update(values.numpy().tobytes())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def latent_key(file_sha256: str, geometry: dict, vae_identity: str) -> str:
    return _hash_json({"kind": "latent", "file": file_sha256, "geometry": geometry, "vae": vae_identity})


def caption_key(caption: str, text_encoder_identity: str) -> str:
    return _hash_json({"kind": "cond", "caption": caption, "clip": text_encoder_identity})


def _atomic_write(path: Path, write, size_hint: int | None = None) -> None:
    """Replace `path` atomically (cache entries may be rewritten; they hold nothing a user made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp"))
    tmp = tmp_dir / path.name
    try:
        try:
            write(tmp)
            os.chmod(tmp, file_mode())
        except Exception as e:
            if is_disk_full(e):
                raise DiskFullError(path, size_hint, e) from e
            raise
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


class EncodeCache:
    """One cache folder. `get_*` return None on a miss; `put_*` write the tensor file at once and
    the index on `flush()` (also atomic), so an interrupted run leaves a consistent cache.

    A cache that cannot be written (disk full, read-only folder) never fails the encode: the encoded
    tensors stay in memory as without a cache, writing stops, and `warning` says why."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.index: dict[str, dict] = {}
        self.hits = 0
        self.misses = 0
        self.warning: str | None = None
        self._changed = False
        index_path = self.root / INDEX_NAME
        if index_path.is_file():
            try:
                data = json.loads(index_path.read_text("utf-8"))
            except (OSError, ValueError):
                data = {}
            if data.get("version") == INDEX_VERSION:
                self.index = dict(data.get("entries", {}))

    def _path(self, key: str) -> Path:
        return self.root / self.index[key]["file"]

    def _load(self, key: str, kind: str) -> dict[str, torch.Tensor] | None:
        import safetensors.torch
        entry = self.index.get(key)
        if entry is None or entry.get("kind") != kind or not self._path(key).is_file():
            self.misses += 1
            return None
        try:
            tensors = safetensors.torch.load_file(str(self._path(key)))
        except Exception:  # a truncated or foreign file is a miss, re-encoded and overwritten
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def _store(self, key: str, kind: str, tensors: dict[str, torch.Tensor], info: dict) -> None:
        import safetensors.torch
        rel = f"{kind}s/{key[:2]}/{key}.safetensors"
        if self.warning is not None:
            return
        clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        try:
            _atomic_write(self.root / rel, lambda tmp: safetensors.torch.save_file(clean, str(tmp)),
                          safetensors_size(clean))
        except Exception as e:
            if not (is_disk_full(e) or isinstance(e, OSError)):
                raise
            self._give_up(e)
            return
        self.index[key] = {"kind": kind, "file": rel, **info}
        self._changed = True

    def _give_up(self, exc: BaseException) -> None:
        self.warning = (f"the encode cache in {self.root} cannot be written ({exc}); this encode keeps its "
                        "results in memory only and the cache is not updated")
        log.warning("Dojo: %s", self.warning)

    def get_latent(self, key: str) -> torch.Tensor | None:
        tensors = self._load(key, "latent")
        return None if tensors is None else tensors["latent"]

    def put_latent(self, key: str, latent: torch.Tensor, source: str = "") -> None:
        self._store(key, "latent", {"latent": latent}, {"shape": list(latent.shape), "source": source})

    def get_cond(self, key: str) -> Conditioning | None:
        tensors = self._load(key, "cond")
        if tensors is None:
            return None
        scalars = self.index[key].get("scalars", {})
        extra = {name[len("extra."):]: t for name, t in tensors.items() if name.startswith("extra.")}
        extra.update(scalars)
        return Conditioning(tensors["context"], tensors.get("pooled"), extra)

    def put_cond(self, key: str, cond: Conditioning, caption: str = "") -> None:
        tensors = {"context": cond.context}
        if cond.pooled is not None:
            tensors["pooled"] = cond.pooled
        scalars = {}
        for name, value in cond.extra.items():
            if torch.is_tensor(value):
                tensors[f"extra.{name}"] = value
            elif isinstance(value, (bool, int, float)):
                scalars[name] = value
            else:
                raise TypeError(f"conditioning extra '{name}' is {type(value).__name__}; only tensors and numbers are cached")
        self._store(key, "cond", tensors, {"caption": caption, "scalars": scalars})

    def flush(self) -> None:
        if self.warning is not None and not self.index:
            return
        if not self._changed and (self.root / INDEX_NAME).is_file():
            return  # a reader (e.g. a data-parallel rank after rank 0 encoded) writes nothing
        data = json.dumps({"version": INDEX_VERSION, "entries": self.index}, indent=1, sort_keys=True)
        try:
            _atomic_write(self.root / INDEX_NAME, lambda tmp: tmp.write_text(data, "utf-8"), len(data))
        except OSError as e:
            self._give_up(e)
