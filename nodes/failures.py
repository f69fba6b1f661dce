"""What the user reads when a run fails: allocation failures at any stage, a diverged loss, a cancel.

Every message names what is kept and what to change; none is a raw allocator or torch error. (Refusing a
job that clearly cannot fit before step 1 is the memory planner's part; this module covers allocations
that fail anyway.)
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from ..training.loop import TrainingDiverged

log = logging.getLogger("comfyui-dojo")

_ALLOCATOR_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate",
                    "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _ALLOCATOR_TEXTS)


class DojoOutOfMemory(RuntimeError):
    """An allocation failed; the message says at which stage and which settings to lower."""


def _kept(last: Path | None) -> str:
    return f"the checkpoint {last} is kept" if last else "no checkpoint had been written yet"


class TrainingOutOfMemory(DojoOutOfMemory):
    def __init__(self, step: int, kept: Path | None):
        super().__init__(f"out of memory at training step {step}. Lower batch_size, the dataset resolution or "
                         f"rank, turn gradient_checkpointing on, or close other programs; {_kept(kept)}.")
        self.step = step


@contextmanager
def out_of_memory_as(stage: str, lower: str):
    """Turn an allocation failure inside the block into DojoOutOfMemory naming `stage` and what to `lower`."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise DojoOutOfMemory(f"out of memory while {stage}. Lower {lower}, or close other programs "
                              f"(the allocator said: {str(e).splitlines()[0][:160]})") from e


@contextmanager
def training_failures(checkpoints, progress):
    """Around the training loop: allocation failures and a diverged loss get the pack's message with the
    checkpoint that is kept (`checkpoints.last`, the newest one this run wrote)."""
    try:
        yield
    except TrainingDiverged as e:
        kept = _kept(checkpoints.last)
        raise TrainingDiverged(e.step, e.loss, kept=f"{kept[0].upper()}{kept[1:]}.") from e
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise TrainingOutOfMemory(len(progress.losses) + 1, checkpoints.last) from e


def report_cancel(steps_done: int, steps: int, last_checkpoint: Path | None, run_dir: Path, root: Path) -> None:
    """Log where a cancelled run is kept and the exact resume_from value that continues it."""
    if last_checkpoint is None:
        log.warning("Dojo: training cancelled before the first step finished; nothing was trained, so no "
                    "checkpoint was written")
        return
    resume = run_dir.relative_to(root).as_posix()
    log.warning("Dojo: training cancelled at step %d of %d; the checkpoint of step %d is kept in %s. "
                "To continue exactly, set resume_from to '%s'", steps_done, steps, steps_done, last_checkpoint, resume)
