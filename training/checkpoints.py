"""Training checkpoints: adapter weights and optimizer state as safetensors, everything else as JSON.

Nothing is pickled. Data order, noise and timesteps are pure functions of (seed, step) (see
batches.py), so the step and the seed are all the "RNG state" a resume needs. A checkpoint records the
run configuration it belongs to; resuming under a different one is refused by name.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import (DiskFullError, clean_stale_temporaries, is_disk_full, next_free_path, safetensors_size,
                    save_safetensors_new, write_new_file, write_new_folder)

log = logging.getLogger("comfyui-dojo")
FORMAT_VERSION = 1
_STEP_NAME = re.compile(r"^step_\d{6,}$")
# Settings that must match for a resume to continue the same run (others, like the checkpoint
# interval, may change).
RUN_IDENTITY_KEYS = ("family", "adapter", "rank", "alpha", "targets", "seed", "batch_size", "grad_accumulation",
                     "learning_rate", "optimizer", "lr_schedule", "warmup_steps", "timestep_sampling",
                     "dataset_fingerprint", "embedding_name", "init_word", "caption_mode", "timestep_range")
# What a checkpoint written before a key existed ran with.
_IDENTITY_DEFAULTS = {"timestep_range": [0.0, 1.0]}


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    step: int
    losses: list[float]
    adapter: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    run: dict


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split torch's optimizer state dict into tensors (for safetensors) and a JSON skeleton."""
    tensors, skeleton = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, pstate in state["state"].items():
        entry = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                name = f"state.{pid}.{key}"
                tensors[name] = value
                entry[key] = {"tensor": name}
            else:
                entry[key] = value
        skeleton["state"][str(pid)] = entry
    return tensors, skeleton


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], skeleton: dict) -> dict:
    state = {}
    for pid, entry in skeleton["state"].items():
        state[int(pid)] = {k: (tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v)
                           for k, v in entry.items()}
    return {"state": state, "param_groups": skeleton["param_groups"]}


def save_checkpoint(directory: Path, step: int, losses: list[float], adapter: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler, run: dict) -> Path:
    """Write `directory/step_NNNNNN/` atomically: its three files go into a temporary folder that is renamed
    into place when complete, so a crash at any moment leaves the previous checkpoints and either no new
    folder or a complete one. Returns the folder."""
    folder = directory / f"step_{step:06d}"
    directory.mkdir(parents=True, exist_ok=True)
    remove_incomplete(directory)
    if os.path.lexists(folder):
        raise FileExistsError(f"checkpoint {folder} already exists; it is never overwritten")
    opt_tensors, opt_skeleton = _flatten_optimizer(optimizer.state_dict())
    meta = {"format": FORMAT_VERSION, "step": step, "losses": losses, "run": run,
            "optimizer": opt_skeleton, "scheduler": scheduler.state_dict()}
    state_text = json.dumps(meta, indent=1)

    def fill(tmp: Path) -> None:
        save_safetensors_new(tmp / "adapter.safetensors", adapter)
        save_safetensors_new(tmp / "optimizer.safetensors", opt_tensors)
        write_new_file(tmp / "state.json", lambda p: p.write_text(state_text))

    try:
        write_new_folder(folder, fill)
    except OSError as e:
        previous = latest_checkpoint(directory)
        kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
        if is_disk_full(e):
            needed = safetensors_size(adapter) + safetensors_size(opt_tensors) + len(state_text)
            raise CheckpointError(f"{DiskFullError(folder, needed)}; {kept}") from e
        raise CheckpointError(f"could not write the checkpoint for step {step} in {directory} "
                              f"({e.strerror or e}); choose another output folder; {kept}") from e
    return folder


def _step_folders(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.glob("step_*") if p.is_dir() and _STEP_NAME.match(p.name))
    except OSError:
        return []


def remove_incomplete(directory: Path) -> list[Path]:
    """Remove what a crash may leave in a run folder: temporary checkpoint folders of a process that is gone,
    and step folders without state.json (written in place by Dojo versions before atomic checkpoints)."""
    removed = clean_stale_temporaries(directory)
    for folder in _step_folders(directory):
        if not (folder / "state.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("Dojo: removed the incomplete checkpoint folder %s (it has no state.json)", folder)
            removed.append(folder)
    return removed


def latest_checkpoint(directory: Path) -> Path | None:
    complete = [p for p in _step_folders(directory) if (p / "state.json").is_file()]
    return complete[-1] if complete else None


def checkpoint_step(folder: Path) -> int:
    return int(folder.name[len("step_"):])


def load_checkpoint(folder: Path) -> Checkpoint:
    import safetensors.torch
    folder = Path(folder)
    if (folder / "state.json").is_file() is False and folder.is_dir():
        found = latest_checkpoint(folder)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in {folder} (looked for step_*/state.json)")
        folder = found
    reading = "state.json"
    try:
        meta = json.loads((folder / reading).read_text())
        reading = "adapter.safetensors"
        adapter = safetensors.torch.load_file(str(folder / reading))
        reading = "optimizer.safetensors"
        opt_tensors = safetensors.torch.load_file(str(folder / reading))
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) on a cut file
        others = [p.name for p in _step_folders(folder.parent) if p != folder and (p / "state.json").is_file()]
        hint = (f"resume from an earlier one instead ({', '.join(f'{folder.parent.name}/{o}' for o in others)})"
                if others else "no other checkpoint of this run exists; start a new run")
        raise CheckpointError(f"checkpoint {folder} is damaged: {reading} cannot be read ({e}); {hint}") from e
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {folder} has format {meta.get('format')}; this Dojo reads {FORMAT_VERSION}")
    return Checkpoint(meta["step"], meta["losses"], adapter, _unflatten_optimizer(opt_tensors, meta["optimizer"]),
                      meta["scheduler"], meta["run"])


@dataclass(frozen=True)
class RunFolders:
    """Where a run reads its starting checkpoint (`resume`, None for a fresh run) and writes its own
    (`run_dir`); `branched` when resuming an earlier step of a run that has later checkpoints: the new
    checkpoints then go to a new folder so that none of the old ones is touched."""
    resume: Path | None
    run_dir: Path
    branched: bool = False


def plan_run_folders(root: Path, resume: Path | None, run_stem: str) -> RunFolders:
    if resume is None:
        return RunFolders(None, next_free_path(root, run_stem, ""))
    if not (resume / "state.json").is_file():  # a run folder: continue its latest complete checkpoint
        latest = latest_checkpoint(resume)
        if latest is None:
            raise CheckpointError(f"no complete checkpoint in {resume} (looked for step_*/state.json); "
                                  "pick a run folder or a run/step_NNNNNN folder written by an earlier run")
        return RunFolders(latest, resume)
    run = resume.parent
    later = [p for p in _step_folders(run) if (p / "state.json").is_file() and p.name > resume.name]
    if not later:
        return RunFolders(resume, run)
    return RunFolders(resume, next_free_path(root, f"{run.name}_from_{resume.name}", ""), branched=True)


def check_resumable(checkpoint: Checkpoint, run: dict) -> None:
    """Refuse to resume a checkpoint from another run configuration, naming every difference."""
    def value(settings: dict, k: str):
        return settings.get(k, _IDENTITY_DEFAULTS.get(k))
    diffs = [f"{k}: checkpoint {value(checkpoint.run, k)!r} vs now {value(run, k)!r}"
             for k in RUN_IDENTITY_KEYS if value(checkpoint.run, k) != value(run, k)]
    if diffs:
        raise CheckpointError("this checkpoint belongs to a different run configuration; resume with the same "
                              "settings or start a new run. Differences: " + "; ".join(diffs))
    if checkpoint.step >= run.get("steps", 0):
        raise CheckpointError(f"the checkpoint is at step {checkpoint.step}, which already reaches the "
                              f"{run.get('steps')} steps asked for; raise steps to continue training")


class RunCheckpoints:
    """The checkpoints of one training run: written by the loop's callback and at the end, read back
    for a resume. `trainable` is what the run trains (adapter or embedding vectors): anything with
    state_dict() / load_state_dict()."""

    def __init__(self, directory: Path | None, run: dict, trainable):
        self.directory, self.run, self.trainable = directory, run, trainable
        self.written: list[Path] = []

    @property
    def last(self) -> Path | None:
        return self.written[-1] if self.written else None

    def kept(self) -> str:
        """What an interrupted run leaves behind, for error messages."""
        if self.last is not None:
            return f"the checkpoint {self.last} is kept (resume_from continues it)"
        return "no checkpoint had been written yet" if self.directory is not None else "rank 0 keeps the checkpoints"

    def write(self, state, optimizer, scheduler) -> None:
        """The loop's on_checkpoint callback (a no-op for runs without a checkpoint folder)."""
        if self.directory is None:
            return
        self.written.append(save_checkpoint(self.directory, state.step, state.losses, self.trainable.state_dict(),
                                            optimizer, scheduler, self.run))
        log.info("Dojo: checkpoint written to %s", self.last)

    def write_final(self, state, optimizer, scheduler) -> None:
        """Checkpoint the final state unless the loop just did: a cancelled run resumes from it, and a
        finished one can be continued with more steps."""
        if state.step == 0 or self.directory is None or (self.last and self.last.name == f"step_{state.step:06d}"):
            return
        existing = self.directory / f"step_{state.step:06d}"
        if (existing / "state.json").is_file():  # the checkpoint this run resumed from: nothing new to keep
            self.written.append(existing)
            return
        self.write(state, optimizer, scheduler)

    def resume(self, folder: Path) -> tuple[int, list[float], dict]:
        """Load `folder` into the trainable after checking it belongs to this run; returns the step, the
        losses so far and the optimizer + scheduler state for the loop."""
        checkpoint = load_checkpoint(folder)
        check_resumable(checkpoint, self.run)
        self.trainable.load_state_dict(checkpoint.adapter)
        return checkpoint.step, list(checkpoint.losses), {"optimizer": checkpoint.optimizer,
                                                          "scheduler": checkpoint.scheduler}
