"""Data-parallel training over torch.distributed (gloo on CPUs, NCCL on GPUs).

Every rank holds the same adapter and runs the same loop. At step k each rank builds the *whole*
global batch's indices, timesteps and noise from the (seed, k) generators, as a single process
would, and trains on its contiguous share of the rows; the gradients of the shares are weighted by
their size and summed across ranks. So every rank ends each step with the gradient a single process
would compute for the whole batch (up to float summation order), the same optimizer step, and the
same weights: `batch_size` is the global batch, and a run resumes under any number of ranks.

What does the work is what torch's DistributedDataParallel does (broadcast the weights at the start,
all-reduce the gradients after backward), done explicitly: ComfyUI calls its model through its own
wrappers, not through a DDP module's forward, and adapter gradients are small enough that one flat
all-reduce per step costs less than DDP's bucketing would save.

A stop (Ctrl-C) is agreed rather than acted on alone: the request rides in the step's all-reduce,
and every rank stops after that same step. A rank that dies or hangs makes the others' collective
fail (a closed connection, or the process group's timeout), never wait for ever.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .protocol import Conditioning

log = logging.getLogger("comfyui-dojo")
DEFAULT_TIMEOUT_S = 1800.0


class PeerLost(RuntimeError):
    """A collective failed: another training process died, or did not answer within the timeout."""


def world_from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun (or `--nproc`) sets them; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", env.get("RANK", 0)))


def init_process_group(backend: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the group torchrun (or `--nproc`) describes in the environment (env:// rendezvous)."""
    if backend == "nccl":
        # NCCL reports a timed-out or failed collective as an error instead of blocking the process.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    rank, world, _ = world_from_environment()
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        try:  # binding the device lets NCCL set up eagerly (torch >= 2.3)
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                    device_id=torch.device("cuda", torch.cuda.current_device()))
            return
        except TypeError:
            pass
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)


def slice_conditioning(cond: Conditioning, rows: slice, batch: int) -> Conditioning:
    """The conditioning of `rows` of a batch of `batch`: every batch-shaped tensor is cut, numbers kept."""
    def cut(x):
        return x[rows] if torch.is_tensor(x) and x.ndim > 0 and x.shape[0] == batch else x
    return Conditioning(cut(cond.context), cut(cond.pooled), {k: cut(v) for k, v in cond.extra.items()})


def shard_rows(batch: int, rank: int, world_size: int) -> slice:
    """Contiguous rows of a global batch of `batch` for `rank`; sizes differ by at most one (a rank may
    get none when the batch is smaller than the world)."""
    base, extra = divmod(batch, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class SingleProcess:
    """The loop's parallel hooks when one process trains: the whole batch, nothing to exchange."""
    rank, world_size, is_main, stop_agreed = 0, 1, True, False

    def shard(self, batch: int) -> slice:
        return slice(0, batch)

    def sync_parameters(self, params) -> None:
        pass

    def reduce_step(self, params, loss: float, step: int) -> float:
        return loss


class DataParallel(SingleProcess):
    """This rank's part in a data-parallel run (see the module docstring). Use as a context manager
    around training: inside it, Ctrl-C asks every rank to stop after the current step."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.stop_requested = False
        self.stop_agreed = False
        self._previous_handler = None

    def shard(self, batch: int) -> slice:
        return shard_rows(batch, self.rank, self.world_size)

    def _device(self, params) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else params[0].device

    def _all_reduce(self, flat: torch.Tensor, what: str, step: int, op=dist.ReduceOp.SUM) -> None:
        try:
            dist.all_reduce(flat, op=op)
        except Exception as e:  # gloo: connection closed / timeout; NCCL: DistBackendError
            raise PeerLost(f"rank {self.rank}: {what} at step {step} failed because another training process "
                           f"stopped or did not answer in time ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e

    def sync_parameters(self, params) -> None:
        """Start every rank from rank 0's weights (what DDP does when it wraps a model)."""
        device = self._device(params)
        flat = torch.cat([p.detach().reshape(-1).to(device, torch.float32) for p in params])
        try:
            dist.broadcast(flat, src=0)
        except Exception as e:
            raise PeerLost(f"rank {self.rank}: the start of training failed because another training process "
                           f"stopped or did not answer in time ({type(e).__name__})") from e
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def reduce_step(self, params, loss: float, step: int) -> float:
        """Sum the share-weighted gradients and losses of all ranks into every rank's `.grad` (one
        flat all-reduce, the stop request riding along); returns the global batch's loss."""
        device = self._device(params)
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, torch.float32)
                 for p in params]
        parts.append(torch.tensor([loss, float(self.stop_requested)], device=device, dtype=torch.float32))
        flat = torch.cat(parts)
        self._all_reduce(flat, "exchanging gradients", step)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        self.stop_agreed = bool(flat[-1] > 0)
        return float(flat[-2])

    def barrier(self, what: str) -> None:
        try:
            dist.barrier()
        except Exception as e:
            raise PeerLost(f"rank {self.rank}: waiting for the other training processes ({what}) failed: "
                           f"one stopped or did not answer in time ({type(e).__name__})") from e

    # Ctrl-C: the terminal sends SIGINT to every rank; each only records it, and the next all-reduce
    # tells all of them, so they stop after the same step (acting alone would leave the others
    # blocked in a collective). A second Ctrl-C aborts at once.
    def _on_sigint(self, signum, frame):
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.is_main:
            log.warning("Dojo: stopping all ranks after this step (the checkpoint is kept); Ctrl-C again to abort")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None
        return False


def current_data_parallel() -> DataParallel | None:
    """A DataParallel for this rank when this process belongs to a process group of several ranks."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DataParallel()
    return None


@contextmanager
def data_parallel():
    """This process's part in training: a DataParallel (with agreed Ctrl-C) inside a process group of
    several ranks, else a SingleProcess."""
    parallel = current_data_parallel()
    if parallel is None:
        yield SingleProcess()
        return
    with parallel:
        yield parallel
