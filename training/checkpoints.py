"""Training checkpoints: adapter weights and optimizer state as safetensors, everything else as JSON.

Nothing is pickled. Data order, noise and timesteps are pure functions of (seed, step) (see
batches.py), so the step and the seed are all the "RNG state" a resume needs. A checkpoint records the
run configuration it belongs to; resuming under a different one is refused by name.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import save_safetensors_new, write_new_file

log = logging.getLogger("comfyui-dojo")
FORMAT_VERSION = 1
# Settings that must match for a resume to continue the same run (others, like the checkpoint
# interval, may change).
RUN_IDENTITY_KEYS = ("family", "adapter", "rank", "alpha", "targets", "seed", "batch_size", "grad_accumulation",
                     "learning_rate", "optimizer", "lr_schedule", "warmup_steps", "timestep_sampling",
                     "dataset_fingerprint", "embedding_name", "init_word", "caption_mode")


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
    """Write `directory/step_NNNNNN/` (three files, each published atomically); returns the folder."""
    folder = directory / f"step_{step:06d}"
    if folder.exists():
        raise FileExistsError(f"checkpoint {folder} already exists; it is never overwritten")
    folder.mkdir(parents=True)
    try:
        opt_tensors, opt_skeleton = _flatten_optimizer(optimizer.state_dict())
        save_safetensors_new(folder / "adapter.safetensors", adapter)
        save_safetensors_new(folder / "optimizer.safetensors", opt_tensors)
        meta = {"format": FORMAT_VERSION, "step": step, "losses": losses, "run": run,
                "optimizer": opt_skeleton, "scheduler": scheduler.state_dict()}
        # state.json is written last: a folder without it is an incomplete checkpoint and is ignored.
        write_new_file(folder / "state.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)  # no half checkpoint; earlier ones are untouched
        previous = latest_checkpoint(directory)
        kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write the checkpoint for step {step} in {directory} "
                              f"({e.strerror or e}); free disk space or choose another output folder; {kept}") from e
    return folder


def latest_checkpoint(directory: Path) -> Path | None:
    complete = sorted(p for p in directory.glob("step_*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def load_checkpoint(folder: Path) -> Checkpoint:
    import safetensors.torch
    folder = Path(folder)
    if (folder / "state.json").is_file() is False and folder.is_dir():
        found = latest_checkpoint(folder)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in {folder} (looked for step_*/state.json)")
        folder = found
    try:
        meta = json.loads((folder / "state.json").read_text())
        adapter = safetensors.torch.load_file(str(folder / "adapter.safetensors"))
        opt_tensors = safetensors.torch.load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {folder}: {e}") from e
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {folder} has format {meta.get('format')}; this Dojo reads {FORMAT_VERSION}")
    return Checkpoint(meta["step"], meta["losses"], adapter, _unflatten_optimizer(opt_tensors, meta["optimizer"]),
                      meta["scheduler"], meta["run"])


def check_resumable(checkpoint: Checkpoint, run: dict) -> None:
    """Refuse to resume a checkpoint from another run configuration, naming every difference."""
    diffs = [f"{k}: checkpoint {checkpoint.run.get(k)!r} vs now {run.get(k)!r}"
             for k in RUN_IDENTITY_KEYS if checkpoint.run.get(k) != run.get(k)]
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
        if state.step > 0 and not (self.last and self.last.name == f"step_{state.step:06d}"):
            self.write(state, optimizer, scheduler)

    def resume(self, folder: Path) -> tuple[int, list[float], dict]:
        """Load `folder` into the trainable after checking it belongs to this run; returns the step, the
        losses so far and the optimizer + scheduler state for the loop."""
        checkpoint = load_checkpoint(folder)
        check_resumable(checkpoint, self.run)
        self.trainable.load_state_dict(checkpoint.adapter)
        return checkpoint.step, list(checkpoint.losses), {"optimizer": checkpoint.optimizer,
                                                          "scheduler": checkpoint.scheduler}
