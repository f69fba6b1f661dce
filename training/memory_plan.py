"""Know before step 1 whether a training job fits in memory, and pick the settings that make it fit.

The peak of one training step on the compute device is

    weights resident on the device (block swap streams the last N blocks instead)
  + adapter parameters + their optimizer state (AdamW fp32: 8 bytes a parameter, 8-bit AdamW: 2,
    Prodigy: 16), which live through every step
  + the peak of the forward + backward: activations saved for backward (all of them, or only the
    block inputs with gradient checkpointing, plus one block's recomputation), the adapter's gradients,
    autocast copies of the weights, and the transients of each op
  + a workspace allowance for what no tensor count sees: on CUDA a fixed amount for the kernels'
    scratch memory and the runtime's growth (RUNTIME_BYTES); on the CPU the oneDNN kernels the first step
    at a new shape compiles and keeps (KERNEL_CACHE_BYTES per distinct bf16 matmul / convolution
    signature) and the holes malloc's heap keeps resident, found by replaying the step's allocations
    through the process's own glibc malloc (MallocReplay; bench/memory_accuracy.py checks both).

The third term is not guessed: `measure_step` runs the real step (the family's real model classes, the
real adapter, the real checkpointing and copy-on-write protection) under torch's `FakeTensorMode`, where
no op computes or allocates, and a `LiveBytes` dispatch mode counts the storages the step creates and
frees, op by op. The arithmetic here (what is resident, what block swap saves, what the optimizer keeps,
what fits, what to suggest) is plain Python over those figures, so the same plan serves a 12-billion-
parameter model built on fake tensors and a tiny one on the CPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import resource
import sys
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .optimizers import OptimizerKind

log = logging.getLogger("comfyui-dojo")

GB = 1e9

# Bytes of optimizer state per trainable parameter. AdamW keeps exp_avg and exp_avg_sq in fp32;
# bitsandbytes' 8-bit AdamW keeps both as uint8 (plus per-block scales, < 1%); Prodigy keeps exp_avg,
# exp_avg_sq, s and the initial weights p0, all fp32.
# Bytes per parameter element of each state tensor, and their sum.
OPTIMIZER_STATE_TENSORS = {OptimizerKind.ADAMW: (4, 4), OptimizerKind.ADAMW_8BIT: (1, 1),
                           OptimizerKind.PRODIGY: (4, 4, 4, 4)}
OPTIMIZER_STATE_BYTES = {kind: sum(sizes) for kind, sizes in OPTIMIZER_STATE_TENSORS.items()}
ADAPTER_MASTER_BYTES = 4    # adapter weights are fp32 master weights

# Safety margin kept free: a fraction of the available memory plus a fixed amount (the allocator's
# fragmentation on CUDA; on the CPU what other threads and the rest of ComfyUI allocate meanwhile).
MARGIN_FRACTION = 0.08
# CPU: nothing fixed; what the runtime adds there is found per step (`cpu_overhead`).
RUNTIME_BYTES = {"cpu": 0, "cuda": 128 * 2**20}
# On the CPU, tensors below glibc's mmap threshold come from malloc's heap, which the first step at a
# new shape fragments; larger tensors are mmapped and returned to the system when freed. By default
# glibc's threshold is dynamic: each freed mmapped chunk raises it, up to 32 MiB on 64-bit, so after the
# first large tensor is freed everything below 32 MiB is heap; a process that fixes the threshold
# (MALLOC_MMAP_THRESHOLD_, or the glibc.malloc.mmap_threshold tunable) turns that off (`heap_limit`, a
# part of the measurement's key). Where malloc is glibc's, MallocReplay measures the heap's growth; where
# it is not, the allowance is this fraction of the heap-sized tensors alive at the peak (fitted on this
# machine in an earlier session). CUDA's caching allocator rounds and splits blocks instead; the margin
# covers it.
HEAP_LIMIT = 32 * 2**20
CPU_HEAP_GROWTH = 0.3


def heap_limit(environ=os.environ) -> int:
    """The size below which this process's tensors come from malloc's heap (see CPU_HEAP_GROWTH)."""
    value = environ.get("MALLOC_MMAP_THRESHOLD_")
    for tunable in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, setting = tunable.partition("=")
        if name == "glibc.malloc.mmap_threshold":
            value = setting
    try:
        return min(int(value), HEAP_LIMIT) if value is not None else HEAP_LIMIT
    except ValueError:
        return HEAP_LIMIT


MARGIN_BYTES = {"cuda": 512 * 2**20, "cpu": 160 * 2**20}

# On the CPU, bf16 matmuls and convolutions run through oneDNN, which compiles a primitive for every new
# shape and keeps it (an LRU cache of 1024): the first step at a new shape grows the process by this much
# per distinct op signature, whatever the tensors' sizes (bench/memory_accuracy.py --kernels measures
# it: ~560 KB a matmul shape, ~90 KB a convolution's, torch 2.13 on x86). Counted as the step creates them,
# so only those made before the step's peak add to it.
KERNEL_CACHE_BYTES = {"mm": 560 * 2**10, "addmm": 560 * 2**10, "bmm": 560 * 2**10, "baddbmm": 560 * 2**10,
                      "convolution": 90 * 2**10, "convolution_backward": 90 * 2**10}


# --- measuring: count live tensor storage, op by op ----------------------------------------------

class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc():
    """glibc's malloc functions, or None where the C library is not glibc (mallinfo2: glibc 2.33+)."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return libc


class MallocReplay:
    """Replays a CPU step's tensor allocations (sizes and order, as the fake step makes and frees them)
    through this process's own glibc malloc, without touching the memory, and keeps the peak growth of
    malloc's footprint (mallinfo2: heap arenas + mmapped chunks). That growth is what the real step adds
    to the process: the live bytes plus the holes glibc leaves where a freed block cannot be reused (by
    default its mmap threshold rises to 32 MiB, so almost every tensor comes from the heap, and freed
    heap memory stays resident), minus the free heap the process already holds. `None` from `create`
    where malloc is not glibc's."""

    ALIGNMENT = 64   # c10's CPU allocator: posix_memalign(64)

    def __init__(self, libc):
        self._libc = libc
        self._blocks: dict = {}
        self._events: list[tuple[int, int]] = []   # (key, size) when made, (key, -1) when freed
        self.start = self.footprint()
        self.peak_growth = 0
        self.failed = False

    @classmethod
    def create(cls) -> "MallocReplay | None":
        """None where malloc is not glibc's, and under an address-space limit (RLIMIT_AS): the replay
        reserves address space up to the step's size, and what the fake step's own Python objects
        allocated meanwhile keep in the heap glibc cannot give back, so it would take the room it
        measures (the older heap allowance is used there)."""
        if resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
            return None
        libc = _glibc()
        return None if libc is None else cls(libc)

    def footprint(self) -> int:
        info = self._libc.mallinfo2()
        return info.arena + info.hblkhd

    def allocate(self, key, size: int, record: bool = True) -> None:
        if self.failed:
            return
        if record:
            self._events.append((key, size))
        block = ctypes.c_void_p()
        if self._libc.posix_memalign(ctypes.byref(block), self.ALIGNMENT, max(size, 1)) != 0:
            self.failed = True  # the step's own allocation would fail here too; give the blocks back
            self.close()
            return
        self._blocks[key] = block.value
        self.peak_growth = max(self.peak_growth, self.footprint() - self.start)

    def free(self, key, record: bool = True) -> None:
        block = self._blocks.pop(key, None)
        if block is not None:
            if record:
                self._events.append((key, -1))
            self._libc.free(block)

    def next_step(self, state_sizes=()) -> None:
        """Go on as the training loop does after the step replayed so far: the optimizer's first update
        allocates its state (`state_sizes`, kept), the gradients are dropped (everything of the step still
        live), and the same step runs again, now finding some of its holes taken by that state."""
        step = list(self._events)
        for i, size in enumerate(state_sizes):
            self.allocate(("state", i), size, record=False)
        for key in [k for k in self._blocks if not isinstance(k, tuple)]:
            self.free(key, record=False)
        for key, size in step:
            if size >= 0:
                self.allocate(("again", key), size, record=False)
            else:
                self.free(("again", key), record=False)

    def close(self) -> None:
        for key in list(self._blocks):
            self.free(key)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage created inside the mode that are still alive, and their peak.

    Every op's outputs are looked at: a storage the op did not receive as an input (so not a view or an
    in-place result) is new, and counted until Python frees it (a finalizer on the storage). Storages
    that existed before the mode (weights, inputs) are never counted. Works on real, meta and fake
    tensors alike, so a fake step measures what a real one would allocate."""

    def __init__(self, replay: MallocReplay | None = None):
        super().__init__()
        self.replay = replay   # CPU: also replay each CPU storage through malloc (MallocReplay)
        self.live = 0
        self.peak = 0
        self.largest = 0
        self.heap_live = 0       # bytes in storages below heap_limit() (see CPU_HEAP_GROWTH)
        self.heap_at_peak = 0
        self.heap_limit = heap_limit()
        self._sizes: dict[int, int] = {}
        self.kernels: set = set()   # oneDNN signatures met (KERNEL_CACHE_BYTES)
        self.kernel_bytes = 0
        self.kernel_bytes_at_peak = 0

    def _kernel(self, func, tensors) -> None:
        cost = KERNEL_CACHE_BYTES.get(func._overloadpacket.__name__)
        if cost is None or not tensors or any(t.device.type != "cpu" or t.dtype != torch.bfloat16 for t in tensors):
            return
        signature = (func, tuple((tuple(t.shape), t.stride()) for t in tensors))
        if signature not in self.kernels:
            self.kernels.add(signature)
            self.kernel_bytes += cost
            if self.replay is not None:  # kept in the heap among the step's tensors (cached: not made again)
                self.replay.allocate(("kernel", len(self.kernels)), cost, record=False)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self._kernel(func, tensors)
        inputs = {_storage_id(t) for t in tensors}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._sizes:
                continue
            size = storage.nbytes()
            self._sizes[key] = size
            self.live += size
            if size < self.heap_limit:
                self.heap_live += size
            self.largest = max(self.largest, size)
            if self.replay is not None and t.device.type == "cpu":
                self.replay.allocate(key, size)
            if self.live + self.kernel_bytes > self.peak + self.kernel_bytes_at_peak:
                self.peak, self.heap_at_peak, self.kernel_bytes_at_peak = self.live, self.heap_live, self.kernel_bytes
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        if self.replay is not None:
            self.replay.free(key)
        size = self._sizes.pop(key, 0)
        self.live -= size
        if size < self.heap_limit:
            self.heap_live -= size


def _storage_id(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except Exception:
        return None


@dataclass(frozen=True)
class StepMeasure:
    """What one fake forward + backward allocated beyond the weights: its peak of live bytes (saved
    activations, gradients, transients), the largest single tensor, and the tokens it ran on."""
    peak_bytes: int
    largest_tensor_bytes: int
    tokens: int
    heap_bytes_at_peak: int = 0
    kernel_bytes_at_peak: int = 0   # CPU: oneDNN primitives compiled before the peak (KERNEL_CACHE_BYTES)
    malloc_growth_bytes: int = -1   # CPU: peak growth of malloc's footprint replaying the step (MallocReplay); -1: none


@contextlib.contextmanager
def fake_tensors():
    """Run torch ops without computing or allocating: real tensors met inside become fake ones. Inside
    an active fake mode (a model built on fake tensors at real size) that mode is used."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    active = next((m for m in _get_current_dispatch_mode_stack() if isinstance(m, FakeTensorMode)), None)
    if active is not None:
        yield active
        return
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention as a GPU runs it (flash; memory-efficient where there is a mask), on
    meta tensors; anything else goes to torch's own function."""
    if q.device.type != "meta":
        return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                  scale=scale)[0]
    bias = attn_mask if attn_mask.dtype != torch.bool else torch.zeros(attn_mask.shape, dtype=q.dtype,
                                                                       device=q.device)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]), True, dropout_p, is_causal,
        scale=scale)[0]


class _FusedAttentionMode(TorchFunctionMode):
    """Sends calls of the original function (callers that imported it by name) to `_fused_attention`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is _SDPA:
            return _fused_attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fused_attention_on_meta():
    """On the meta device (where real-size models are planned for a GPU), run scaled_dot_product_attention
    as the fused kernels a GPU runs, whose memory is linear in the tokens: on meta tensors torch would
    pick the math kernel, which keeps the full attention matrix, and plan gigabytes a GPU never
    allocates. A torch-function mode alone is not enough: autograd runs a checkpointed block's
    recomputation (inside backward) with torch-function modes off, so `torch.nn.functional`'s attribute
    is also replaced while measuring (callers such as ComfyUI look it up at call time); non-meta calls go
    to torch's own function unchanged."""
    functional = torch.nn.functional
    functional.scaled_dot_product_attention = _fused_attention
    try:
        with _FusedAttentionMode():
            yield
    finally:
        functional.scaled_dot_product_attention = _SDPA


def measure_step(step: Callable[[], None], tokens: int, state_sizes=()) -> StepMeasure:
    """Run `step` (one forward + backward, building its inputs inside) on fake tensors and count what
    it allocates. The trainable parameters' `.grad` it creates are reset to None afterwards. On the CPU
    the step's storages are also replayed through malloc (MallocReplay), twice, with the optimizer
    state (`state_sizes`, bytes per tensor) allocated in between, as the training loop's first two steps."""
    replay = MallocReplay.create()
    counter = LiveBytes(replay)
    try:
        with fake_tensors(), counter, fused_attention_on_meta():
            step()
        if replay is not None and replay.peak_growth:
            replay.next_step(state_sizes)
    finally:
        if replay is not None:
            replay.close()
    # Where no CPU storage was replayed (a GPU or meta step), or malloc refused one, there is no growth to report.
    growth = -1 if replay is None or replay.failed or replay.peak_growth == 0 else replay.peak_growth
    return StepMeasure(counter.peak, counter.largest, tokens, counter.heap_at_peak, counter.kernel_bytes_at_peak,
                       growth)


# --- remembering measurements --------------------------------------------------------------------

# Bump when what a fake step counts changes, so measurements saved on disk by an older pack are not reused.
MEASURE_FORMAT = 3


def module_signature(module: torch.nn.Module) -> str:
    """A hash of a network's structure as the step sees it: every parameter's and buffer's name, shape,
    dtype, device type and whether it trains (the adapter's layers included), and the module types."""
    h = hashlib.sha256()
    for name, sub in module.named_modules():
        h.update(f"m {name} {type(sub).__qualname__}\n".encode())
    for kind, tensors in (("p", module.named_parameters()), ("b", module.named_buffers())):
        for name, t in tensors:
            h.update(f"{kind} {name} {tuple(t.shape)} {t.dtype} {t.device.type} {t.requires_grad}\n".encode())
    return h.hexdigest()


def measure_key(parts: dict) -> str:
    """The key of one measurement: a hash of everything the fake step's peak depends on (`parts`: the
    model's signature, the batch's tensor shapes, dtypes, settings and code versions), JSON-encoded."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


class MeasureCache:
    """Step measurements already made, by `measure_key`: in this process (the last `size` of them) and,
    with `folder`, as small JSON files there, so a second start of the same job, even after a restart,
    skips the fake step (1-4 minutes at real size on a CPU). A file that cannot be read or does not hold
    a measurement is ignored and measured again; writes are atomic and an existing file is kept."""

    def __init__(self, folder: str | None = None, size: int = 64):
        self.folder, self.size = folder, size
        self._memory: OrderedDict[str, StepMeasure] = OrderedDict()
        self._lock = threading.Lock()

    def _path(self, key: str) -> str | None:
        return None if self.folder is None else os.path.join(self.folder, f"{key}.json")

    def get(self, key: str) -> StepMeasure | None:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        path = self._path(key)
        if path is None or not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            m = StepMeasure(**{k: int(data[k]) for k in ("peak_bytes", "largest_tensor_bytes", "tokens",
                                                             "heap_bytes_at_peak", "kernel_bytes_at_peak",
                                                             "malloc_growth_bytes")})
            if data.get("format") != MEASURE_FORMAT or min(m.peak_bytes, m.largest_tensor_bytes) < 0:
                return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        self._remember(key, m)
        return m

    def put(self, key: str, m: StepMeasure) -> None:
        self._remember(key, m)
        path = self._path(key)
        if path is None or os.path.exists(path):
            return
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"format": MEASURE_FORMAT, **vars(m)}, f)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:  # a cache: failing to keep it costs a measurement next time, nothing else
            log.debug("Dojo: could not save the memory measurement in %s: %s", self.folder, exc)

    def _remember(self, key: str, m: StepMeasure) -> None:
        with self._lock:
            self._memory[key] = m
            self._memory.move_to_end(key)
            while len(self._memory) > self.size:
                self._memory.popitem(last=False)


# --- the arithmetic ------------------------------------------------------------------------------

def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class ModelMemory:
    """The model's weights as the step will hold them on the compute device."""
    other_bytes: int                      # weights outside the swappable blocks (always resident)
    block_bytes: tuple[int, ...] = ()     # per swappable block, in order; block swap parks the last N
    swap_saves_memory: bool = True        # False when the compute device is the offload device (CPU)

    @property
    def total_bytes(self) -> int:
        return self.other_bytes + sum(self.block_bytes)

    def resident_bytes(self, blocks_to_swap: int, checkpointing: bool) -> int:
        """Weights on the device during a step. Parked blocks cost the largest one's copy twice (its
        forward copy and, in a checkpointed backward, its recomputation's); without checkpointing
        autograd keeps every streamed copy until backward, so swapping saves nothing."""
        swap = min(max(blocks_to_swap, 0), len(self.block_bytes))
        if swap == 0 or not self.swap_saves_memory or not checkpointing:
            return self.total_bytes + (2 * max(self.block_bytes[-swap:]) if swap else 0)
        kept = self.block_bytes[:len(self.block_bytes) - swap]
        return self.other_bytes + sum(kept) + 2 * max(self.block_bytes[-swap:])


def optimizer_bytes(params: int, optimizer: OptimizerKind) -> int:
    return params * OPTIMIZER_STATE_BYTES[OptimizerKind(optimizer)]


@dataclass(frozen=True)
class Estimate:
    checkpointing: bool
    blocks_to_swap: int
    weights: int
    adapter: int          # adapter master weights + optimizer state
    activations: int      # measured step peak: saved activations, gradients, transients (or a preview's)
    workspace: int
    preview: int = 0      # measured peak of a preview's sampling forward (0: no previews)

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.workspace

    @property
    def preview_dominates(self) -> bool:
        return self.preview > 0 and self.preview >= self.activations

    def parts(self) -> str:
        what = "activations of a preview's sampling" if self.preview_dominates else "activations + gradients"
        return (f"weights {gb(self.weights)}, adapter + optimizer {gb(self.adapter)}, "
                f"{what} {gb(self.activations)}, workspace {gb(self.workspace)}")


@dataclass(frozen=True)
class StepJob:
    """What the planner knows of a job before step 1. `measure(checkpointing)` runs the fake step
    (cached: each setting is measured at most once)."""
    model: ModelMemory
    adapter_params: int
    optimizer: OptimizerKind
    measure: Callable[[bool], StepMeasure]
    device_type: str = "cpu"
    batch_size: int = 1
    weight_dtype_bytes: int = 2
    # A preview's sampling forward between steps (training.previews), measured the same way; None: no
    # previews. It runs while the adapter and optimizer state stay, but the step's activations are freed.
    measure_preview: Callable[[], StepMeasure] | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def measured(self, checkpointing: bool) -> StepMeasure:
        if checkpointing not in self._cache:
            self._cache[checkpointing] = self.measure(checkpointing)
        return self._cache[checkpointing]

    def measured_preview(self) -> StepMeasure | None:
        if self.measure_preview is None:
            return None
        if "preview" not in self._cache:
            self._cache["preview"] = self.measure_preview()
        return self._cache["preview"]


def estimate(job: StepJob, checkpointing: bool, blocks_to_swap: int = 0) -> Estimate:
    m = job.measured(checkpointing)
    adapter = job.adapter_params * ADAPTER_MASTER_BYTES + optimizer_bytes(job.adapter_params, job.optimizer)
    runtime = RUNTIME_BYTES.get(job.device_type, RUNTIME_BYTES["cuda"])
    preview = job.measured_preview()
    peak = m if preview is None or preview.peak_bytes <= m.peak_bytes else preview
    if job.device_type == "cpu":
        runtime += cpu_overhead(peak)
    return Estimate(checkpointing, blocks_to_swap, job.model.resident_bytes(blocks_to_swap, checkpointing),
                    adapter, peak.peak_bytes, runtime, preview.peak_bytes if preview is not None else 0)


def cpu_overhead(m: StepMeasure) -> int:
    """What a CPU step adds beyond its live tensor bytes: oneDNN's kept kernels and malloc's heap. Where
    the step was replayed through malloc (kernels included, as they are made), the replay's growth beyond
    the live peak, never below zero (free heap the process holds now may be gone by the time it trains):
    freed heap memory stays resident, so kernels made after the tensors' peak count too. Else the kernels
    made before the peak and the older allowance, a fraction of the heap-sized tensors alive at the peak."""
    if m.malloc_growth_bytes >= 0:
        return max(0, m.malloc_growth_bytes - m.peak_bytes)
    return m.kernel_bytes_at_peak + int(CPU_HEAP_GROWTH * m.heap_bytes_at_peak)


def safety_margin(available: int, device_type: str) -> int:
    return int(available * MARGIN_FRACTION) + MARGIN_BYTES.get(device_type, MARGIN_BYTES["cuda"])


@dataclass(frozen=True)
class Plan:
    fits: bool
    estimate: Estimate
    available: int
    margin: int
    chosen: tuple[str, ...] = ()          # what the planner decided (settings that were 'auto')
    suggestions: tuple[str, ...] = ()     # when nothing fits: settings that would

    @property
    def checkpointing(self) -> bool:
        return self.estimate.checkpointing

    @property
    def blocks_to_swap(self) -> int:
        return self.estimate.blocks_to_swap

    def summary(self) -> str:
        """One line for the progress text and the log, e.g.
        'est. 11.2 GB of 12.0 GB free: checkpointing on, 8 blocks swapped'."""
        swap = f"{self.blocks_to_swap} blocks swapped" if self.blocks_to_swap else "no block swap"
        head = f"est. {gb(self.estimate.total)} of {gb(self.available)} free: " \
               f"checkpointing {'on' if self.checkpointing else 'off'}, {swap}"
        return head if self.fits else head + " (does not fit)"


def plan(job: StepJob, available: int, device_type: str, *, checkpointing: bool | None,
         blocks_to_swap: int | None, default_checkpointing: bool = False) -> Plan:
    """The cheapest settings that fit. `None` = 'auto' (the planner chooses); a value is the user's and
    is kept. Tried in order of speed: the default checkpointing without swap, checkpointing on, then
    checkpointing on with 1, 2, ... blocks swapped (only where swapping frees device memory)."""
    margin = safety_margin(available, device_type)
    budget = available - margin
    candidates: list[tuple[bool, int]] = []
    gc_options = [checkpointing] if checkpointing is not None else \
        list(dict.fromkeys([default_checkpointing, True]))
    n_blocks = len(job.model.block_bytes)
    for gc in gc_options:
        if blocks_to_swap is not None:
            candidates.append((gc, blocks_to_swap))
        else:
            swaps = range(n_blocks + 1) if (gc and job.model.swap_saves_memory) else [0]
            candidates += [(gc, s) for s in swaps]
    best = None
    for gc, swap in candidates:
        e = estimate(job, gc, swap)
        if best is None or e.total < best.total:
            best = e
        if e.total <= budget:
            chosen = []
            if checkpointing is None:
                chosen.append(f"checkpointing {'on' if gc else 'off'}")
            if blocks_to_swap is None and swap:
                chosen.append(f"{swap} blocks swapped")
            return Plan(True, e, available, margin, tuple(chosen))
    return Plan(False, best, available, margin, (), tuple(suggest(job, best, budget, device_type)))


def suggest(job: StepJob, best: Estimate, budget: int, device_type: str) -> list[str]:
    """Settings that would fit, from the best estimate: activations scale with the batch's tokens
    (latent height x width x frames), weights with their dtype."""
    out = []
    fixed = best.total - best.activations - best.workspace
    room = budget - fixed
    if room > 0 and best.activations + best.workspace > 0:
        ratio = room / (best.activations + best.workspace)
        if job.batch_size > 1 and math.floor(job.batch_size * ratio) >= 1:
            out.append(f"batch_size {math.floor(job.batch_size * ratio)} (now {job.batch_size})")
        if ratio < 1:
            out.append(f"a lower resolution: about {math.sqrt(ratio):.2f}x the side of the biggest bucket "
                       f"(fewer pixels), or about {ratio:.2f}x the frames per clip")
    if job.weight_dtype_bytes > 1:
        saved = best.weights * (1 - 1 / job.weight_dtype_bytes)
        if best.total - saved <= budget:
            out.append("fp8 weights (load the model with weight_dtype fp8_e4m3fn)")
    if best.adapter and job.optimizer is not OptimizerKind.ADAMW_8BIT:
        eight_bit = best.total - optimizer_bytes(job.adapter_params, job.optimizer) \
            + optimizer_bytes(job.adapter_params, OptimizerKind.ADAMW_8BIT)
        if eight_bit <= budget:
            out.append("optimizer adamw8bit")
    if best.preview_dominates:
        out.append("smaller previews (sample_width / sample_height / sample_frames), or sample_every 0")
    if not best.checkpointing:
        out.append("gradient_checkpointing on")
    if not out:
        out.append("a smaller model, or a device with more memory" if room <= 0 else
                   "a lower resolution or fewer frames")
    return out


class MemoryPlanRefused(RuntimeError):
    """The job does not fit with any setting the planner may choose; raised before step 1 (not a
    MemoryError: nothing failed to allocate, and handlers of real allocation failures must not take it)."""

    def __init__(self, p: Plan, what: str = "this training job"):
        self.plan = p
        e = p.estimate
        super().__init__(
            f"{what} needs an estimated {gb(e.total)} ({e.parts()}) with the best settings allowed "
            f"(checkpointing {'on' if e.checkpointing else 'off'}, blocks_to_swap {e.blocks_to_swap}), but only "
            f"{gb(p.available)} is free (keeping {gb(p.margin)} spare). Refused before step 1 so nothing "
            f"is killed mid-run. Settings that would fit: {'; '.join(p.suggestions)}. Or set memory_plan to "
            f"'off' to try anyway.")


def gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if abs(n) >= 0.1 * GB else f"{n / 2**20:.0f} MB"


# --- what is free ---------------------------------------------------------------------------------

def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _self_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), when a limit is set."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line.strip().split(":", 2)[2] for line in f if line.startswith("0::")), None)
    except OSError:
        return None
    if path is None:
        return None
    base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
    try:
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as f:
            current = int(f.read().strip())
        return int(limit) - current
    except (OSError, ValueError):
        return None


def cpu_free_bytes() -> tuple[int, str]:
    """What this process may still allocate: the least of the system's available RAM, the address-
    space limit (RLIMIT_AS, what `prlimit --as` / `ulimit -v` set) minus the address space in use,
    and the cgroup's memory.max minus its usage."""
    options = []
    available = _meminfo_available()
    if available is not None:
        options.append((available, "available RAM"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = _self_status("VmSize") or 0
        options.append((soft - used, "address-space limit (RLIMIT_AS)"))
    room = _cgroup_room()
    if room is not None:
        options.append((room, "cgroup memory.max"))
    if not options:
        return 0, "unknown"
    return min(options)


def free_bytes(device: torch.device | str) -> tuple[int, str]:
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "free CUDA memory"
    return cpu_free_bytes()


def with_resident(free: int, resident: int) -> int:
    """Memory the step may use: what is free plus what the model already holds on the device (the
    estimate counts those weights itself)."""
    return free + resident



# --- the step the planner measures ----------------------------------------------------------------

def biggest_sample(samples):
    """The sample whose step costs most: the most latent elements, then the longest text."""
    return max(samples, key=lambda s: (s.latent.numel(), s.cond.context.shape[1]))


def probe_sampling_step(model, sample, latent_shape, batch_size: int, device) -> StepMeasure:
    """Measure one denoising forward of a preview (no autograd, so nothing is saved and checkpointing
    passes straight through) at the preview's latent shape [C, (T,) H, W], `batch_size` wide (2 when
    classifier-free guidance batches the negative prompt with the positive), with `sample`'s
    conditioning, on fake tensors."""
    from .batches import Sample, collate
    preview = Sample(torch.zeros(latent_shape), sample.cond)
    batch = collate([preview] * batch_size, list(range(batch_size)))
    device = torch.device(device)
    tokens = batch_size * (preview.latent[0].numel() + sample.cond.context.shape[1])

    def step():
        with torch.no_grad():
            model.predict(batch.latents.to(device, torch.float32), torch.full((batch_size,), 0.5, device=device),
                          batch.cond.to(device))

    return measure_step(step, tokens)


def probe_training_step(model, samples, batch_size: int, config, params, region, device,
                        checkpointing: bool) -> StepMeasure:
    """Measure one forward + backward of the training loop's own loss (`loop.diffusion_loss`) on the
    biggest bucket at `batch_size`, inside `region(checkpointing)` (the trainer's checkpointing and
    gradient protection), on fake tensors. Gradients it leaves on `params` are removed."""
    from .batches import collate
    from .loop import Precision, diffusion_loss
    sample = biggest_sample(samples)
    batch = collate([sample] * batch_size, list(range(batch_size)))
    device = torch.device(device)
    positions = sample.latent[0].numel()
    tokens = batch_size * (positions + sample.cond.context.shape[1])

    def step():
        latents = batch.latents.to(device, torch.float32)
        t = torch.full((batch_size,), 0.5, device=device)
        noise = torch.zeros_like(latents)
        # (No autocast on the meta device, where real-size models are planned: their weights are bf16.)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) \
            if Precision(config.precision) is Precision.BF16 and device.type != "meta" else contextlib.nullcontext()
        with autocast:
            loss = diffusion_loss(model, latents, batch.cond.to(device), t, noise, config.min_snr_gamma)
        loss.backward()

    params = list(params)
    state_sizes = [p.numel() * n for p in params for n in OPTIMIZER_STATE_TENSORS[OptimizerKind(config.optimizer)]]
    try:
        with region(checkpointing):
            return measure_step(step, tokens, state_sizes)
    finally:
        for p in params:
            p.grad = None
