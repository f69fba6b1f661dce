"""Writing files so that nothing is lost: atomic, never over an existing file, 0644, and a clear message
(naming the file, its folder and the space needed) when the disk is full.

Temporaries are folders named `.<final name>.dojo-<pid>-<random>.tmp` next to the final place: ComfyUI
lists no such name, and one whose process is gone (kill -9 during a save) is removed by the next write
into that folder.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

TEMP_MARK = ".dojo-"
_TEMP_NAME = re.compile(r"^\..+\.dojo-(\d+)-[^/]*\.tmp$")
# Names longer than this cannot take a counter and a suffix on common filesystems (255 bytes a name).
MAX_NAME_BYTES = 200


class DiskFullError(OSError):
    """No space (or quota) left while writing `path`; the partial file is already removed."""

    def __init__(self, path: Path, needed: int | None, cause: BaseException | None = None):
        folder = Path(path).parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        need = f"it needs about {_size(needed)}" if needed else "it needs more space"
        have = f" and {_size(free)} are free there" if free is not None else ""
        super().__init__(errno.ENOSPC, f"No space left on the disk to write {Path(path).name} in {folder}: {need}{have}. "
                                       "Free some space or choose a folder on another disk; the partial file was "
                                       "removed and earlier files are untouched")
        self.path, self.needed, self.free = Path(path), needed, free

    def __str__(self):
        return self.strerror


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT as an OSError, or as safetensors' own error (a plain Exception with the OS text)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and ("No space left" in text or "quota exceeded" in text.lower())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """0666 less the process umask: what an ordinary open() would create (0644 under the usual 022)."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    return 0o777 & ~_umask()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove temporary files and folders left in `folder` by a Dojo process that no longer runs."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def is_temporary(name: str) -> bool:
    return bool(_TEMP_NAME.match(name))


def temp_prefix(path: Path) -> str:
    return f".{path.name}{TEMP_MARK}{os.getpid()}-"


def next_free_path(directory: Path, stem: str, suffix: str) -> Path:
    """`stem_00001.suffix`, counting up past every existing name (ComfyUI's own naming habit); a name
    taken by anything, a dangling symbolic link included, is skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    counter = 1
    while True:
        candidate = directory / f"{stem}_{counter:05d}{suffix}"
        if not os.path.lexists(candidate):
            return candidate
        counter += 1


def write_new_file(path: Path, write: Callable[[Path], None], size_hint: int | None = None) -> Path:
    """Write through `write(temp_path)` and publish the result at `path` only when complete.

    The temporary file lives in the same folder; `os.link` publishes it atomically and fails if `path`
    appeared meanwhile, so an existing file is never replaced and a crash leaves no partial file
    under the final name. A full disk raises DiskFullError (the temporary file is removed).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    # A private temporary folder, not just a file: writers such as safetensors make temporaries of their
    # own beside the file they are given, and a kill -9 must leave nothing but this one folder to clean.
    tmp_dir = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    tmp_path = tmp_dir / path.name
    try:
        try:
            write(tmp_path)
            os.chmod(tmp_path, file_mode())
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
        except Exception as e:
            if is_disk_full(e):
                raise DiskFullError(path, size_hint, e) from e
            raise
        try:
            os.link(tmp_path, path)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{path.name} appeared in {path.parent} while it was being written "
                                  "(another save at the same moment?); it was not overwritten: save again for the "
                                  "next free name", str(path)) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def safetensors_size(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> int:
    """Roughly the bytes a safetensors file of these tensors takes (data plus a generous header)."""
    header = 64 * len(tensors) + sum(len(k) for k in tensors) + len(json.dumps(metadata or {}))
    return sum(t.numel() * t.element_size() for t in tensors.values()) + header + 8


def save_safetensors_new(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    import safetensors.torch
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    return write_new_file(path, lambda tmp: safetensors.torch.save_file(clean, str(tmp), metadata=meta),
                          size_hint=safetensors_size(clean, meta))


def write_new_folder(path: Path, fill: Callable[[Path], None]) -> Path:
    """Create the folder `path` complete or not at all: `fill(temp_folder)` writes its files into a
    temporary folder beside it, which is then renamed into place. A crash (kill -9) at any moment
    leaves no folder under the final name; an existing `path` is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, f"{path} already exists; it is never overwritten", str(path))
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, folder_mode())  # mkdtemp makes 0700
        try:
            fill(tmp)
        except DiskFullError as e:  # name the folder the user asked for, not the temporary one
            raise DiskFullError(path / e.path.relative_to(tmp), e.needed) from e
        _fsync_dir(tmp)
        if os.path.lexists(path):  # made meanwhile: rename would replace an empty folder, so stop here
            raise FileExistsError(errno.EEXIST, f"{path} appeared while it was being written; it was not replaced",
                                  str(path))
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
