"""Writing files so that nothing is lost: atomic, and never over an existing file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


def next_free_path(directory: Path, stem: str, suffix: str) -> Path:
    """`stem_00001.suffix`, counting up past every existing file (ComfyUI's own naming habit)."""
    directory.mkdir(parents=True, exist_ok=True)
    counter = 1
    while True:
        candidate = directory / f"{stem}_{counter:05d}{suffix}"
        if not candidate.exists():
            return candidate
        counter += 1


def write_new_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through `write(temp_path)` and publish the result at `path` only when complete.

    The temporary file lives in the same folder; `os.link` publishes it atomically and fails if `path`
    appeared meanwhile, so an existing file is never replaced and a crash leaves no partial file
    under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.link(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def save_safetensors_new(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    import safetensors.torch
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    return write_new_file(path, lambda tmp: safetensors.torch.save_file(clean, str(tmp), metadata=meta))


def new_folder(directory: Path, stem: str) -> Path:
    """A new, empty `stem_NNNNN` folder inside `directory`: created atomically with mkdir, so an existing
    folder (another export, or one made meanwhile) is never reused."""
    directory.mkdir(parents=True, exist_ok=True)
    counter = 1
    while True:
        candidate = directory / f"{stem}_{counter:05d}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            counter += 1
