"""The training loop: one function to read top to bottom.

It knows a `DenoisingModel` (predict the native target), an attached adapter (the trainable
parameters), a `BatchSchedule` (what to train on at step k) and a `TrainConfig`. Everything random in
step k comes from generators seeded by (seed, k), so a run is reproducible bit for bit and resumable
from any saved step.
"""
from __future__ import annotations

import enum
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .adapters import AttachedAdapter
from .batches import BatchSchedule, step_generator
from .distributed import SingleProcess, slice_conditioning
from .optimizers import OptimizerKind, make_optimizer as make_base_optimizer
from .protocol import DenoisingModel, Prediction
from .timesteps import FULL_RANGE, TimestepSampling, check_range, sample_timesteps


class LRSchedule(str, enum.Enum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class Precision(str, enum.Enum):
    BF16 = "bf16"   # bf16 autocast for activations, fp32 adapter (master) weights
    FP32 = "fp32"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    learning_rate: float = 1e-4
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    grad_accumulation: int = 1
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    warmup_steps: int = 0
    timestep_sampling: TimestepSampling = TimestepSampling.UNIFORM
    shift: float | None = None          # None: the model's own inference shift
    # The noise levels (t in [0, 1]) training samples from, e.g. one Wan 2.2 A14B expert's share.
    timestep_range: tuple[float, float] = FULL_RANGE
    min_snr_gamma: float = 0.0          # 0: off; eps / v models only
    noise_offset: float = 0.0           # eps / v models only
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    precision: Precision = Precision.BF16
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps})")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be positive (got {self.learning_rate}); try 1e-4")
        if self.grad_accumulation < 1:
            raise ValueError(f"gradient accumulation must be at least 1 (got {self.grad_accumulation})")
        if self.warmup_steps < 0 or (self.warmup_steps > 0 and self.warmup_steps >= self.steps):
            raise ValueError(f"warm-up ({self.warmup_steps} steps) must be shorter than training ({self.steps} steps)")
        check_range(self.timestep_range)

    def to_dict(self) -> dict:
        return {k: (v.value if isinstance(v, enum.Enum) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}


class TrainingDiverged(RuntimeError):
    def __init__(self, step: int, loss: float, kept: str = ""):
        super().__init__(f"loss became {loss} at step {step}: training diverged. Lower the learning rate "
                         f"(or use fp32 precision).{' ' + kept if kept else ''}")
        self.step, self.loss = step, loss


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)


@dataclass
class Callbacks:
    on_step: Callable[[int, float, float], None] | None = None   # (step done, loss, lr)
    should_stop: Callable[[], bool] | None = None                 # e.g. ComfyUI's cancel
    on_checkpoint: Callable[[TrainState, torch.optim.Optimizer, object], None] | None = None
    # Recognises a cancel raised from inside the model's forward (ComfyUI checks its interrupt at every
    # op): the unfinished step is dropped and the loop returns after the last finished one.
    is_cancel: Callable[[BaseException], bool] | None = None


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.lr_schedule is LRSchedule.LINEAR:
        return 1.0 - progress
    if config.lr_schedule is LRSchedule.COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_optimizer(params, config: TrainConfig):
    """`params`: parameters, or param groups with their own "lr" and "until" (the fraction of the steps
    the group trains; its learning rate is 0 afterwards), e.g. a LoRA and an embedding trained together."""
    optimizer = make_base_optimizer(config.optimizer, params, config.learning_rate, config.weight_decay)
    untils = [group.get("until", 1.0) for group in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        (lambda s, stop=until * config.steps: lr_factor(config, s) if s < stop else 0.0) for until in untils])
    return optimizer, scheduler


def diffusion_loss(model: DenoisingModel, latents: torch.Tensor, cond, t: torch.Tensor,
                   noise: torch.Tensor, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean squared error of the model's native prediction, optionally min-SNR weighted per sample."""
    schedule = model.schedule
    noisy = schedule.add_noise(latents, noise, t)
    target = schedule.target(latents, noise, t)
    pred = model.predict(noisy, t, cond)
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma > 0 and not schedule.is_flow:
        alpha, sigma = schedule.coefficients(t)
        snr = (alpha / sigma) ** 2
        clipped = snr.clamp(max=min_snr_gamma)
        weight = clipped / (snr + 1) if schedule.prediction is Prediction.V else clipped / snr
        per_sample = per_sample * weight.to(per_sample.device)
    return per_sample.mean()


def train(model: DenoisingModel, adapter: AttachedAdapter, data: BatchSchedule, config: TrainConfig,
          device: torch.device | str = "cpu", state: TrainState | None = None,
          optimizer_state: dict | None = None, callbacks: Callbacks | None = None,
          checkpoint_every: int = 0, parallel: SingleProcess | None = None,
          ) -> tuple[TrainState, torch.optim.Optimizer, object]:
    """`parallel` (training/distributed.py) makes this one rank of a data-parallel run: it trains on its
    share of each global batch and the ranks' gradients are summed before the optimizer step."""
    config.validate()
    callbacks = callbacks or Callbacks()
    state = state or TrainState()
    device = torch.device(device)
    params = adapter.parameters()
    groups = adapter.param_groups() if hasattr(adapter, "param_groups") else None
    optimizer, scheduler = make_optimizer(groups or params, config)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
    shift = config.shift if config.shift is not None else model.schedule.shift
    use_bf16 = config.precision is Precision.BF16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    adapter.let_autocast_cast_inputs(use_bf16)
    parallel = parallel or SingleProcess()
    parallel.sync_parameters(params)

    while state.step < config.steps:
        if callbacks.should_stop is not None and callbacks.should_stop():
            break
        step = state.step
        step_loss = 0.0
        try:
            for micro in range(config.grad_accumulation):
                batch = data.batch(step * config.grad_accumulation + micro)
                latents = batch.latents.to(device, torch.float32)
                g = step_generator(config.seed, step * config.grad_accumulation + micro)
                t = sample_timesteps(config.timestep_sampling, latents.shape[0], g, shift=shift,
                                     t_range=config.timestep_range)
                noise = torch.randn(latents.shape, generator=g)
                if config.noise_offset and not model.schedule.is_flow:
                    noise = noise + config.noise_offset * torch.randn(
                        (*latents.shape[:2], *[1] * (latents.ndim - 2)), generator=g)
                # Noise and timesteps are drawn for the whole batch first, so a sample gets the same ones
                # whichever rank trains it; this process then trains its rows (all of them when alone).
                rows, n = parallel.shard(len(batch.indices)), len(batch.indices)
                share = (rows.stop - rows.start) / n
                if share == 0:
                    continue
                cond = batch.cond if share == 1 else slice_conditioning(batch.cond, rows, n)
                with autocast:
                    loss = diffusion_loss(model, latents[rows], cond.to(device),
                                          t[rows].to(device), noise[rows].to(device), config.min_snr_gamma)
                (loss * share / config.grad_accumulation).backward()
                step_loss += loss.item() * share / config.grad_accumulation
        except BaseException as e:
            if callbacks.is_cancel is None or not callbacks.is_cancel(e):
                raise
            optimizer.zero_grad(set_to_none=True)  # the unfinished step leaves no trace
            break
        step_loss = parallel.reduce_step(params, step_loss, step + 1)
        if not math.isfinite(step_loss):  # after the exchange, so that every rank stops together
            raise TrainingDiverged(step + 1, step_loss)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.losses.append(step_loss)
        if callbacks.on_step is not None:
            try:  # a cancel in a step callback (e.g. a preview being sampled) keeps the finished step
                callbacks.on_step(state.step, step_loss, scheduler.get_last_lr()[0])
            except BaseException as e:
                if callbacks.is_cancel is None or not callbacks.is_cancel(e):
                    raise
                break
        if checkpoint_every and state.step % checkpoint_every == 0 and callbacks.on_checkpoint is not None:
            callbacks.on_checkpoint(state, optimizer, scheduler)
    return state, optimizer, scheduler
