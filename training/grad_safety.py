"""Correct gradients through modules that mutate tensors autograd saved (ComfyUI's Flux-style blocks).

Model code such as `x += residual` overwrites a tensor that an earlier op (a LayerNorm, a matmul) saved
for backward. Plain autograd then raises ("modified by an inplace operation"); torch's checkpointing
hides the damage and returns wrong gradients, because it recomputes from inputs the block already
overwrote and stores recomputed tensors by reference. This module fixes both cases without touching the
model code and without global state:

* `copy_on_write_saved_tensors()` installs `saved_tensors_hooks` that keep a reference plus the version
  of every saved tensor, and a thread-local `TorchFunctionMode` that, right before any in-place op,
  copies the saved tensors that share the target's storage. Only tensors that are really overwritten
  are copied, so memory is what out-of-place code would use. At unpack time every uncopied tensor's
  version is checked; a mutation the mode did not see raises `UnsafeInplaceError` instead of yielding a
  wrong gradient.
* `clone_stream_reads(blocks)` is the cheap form for blocks whose only in-place writes go into their own
  inputs (ComfyUI's Flux-style `img += ...`): each direct submodule of a running block gets a copy of any
  block input it is handed, so what the submodules save is never the tensor the block overwrites. No
  per-op dispatch and no saved-tensor hooks: autograd's own version check still raises on any other
  write into a saved tensor, so a block that breaks the assumption fails loudly, never silently.
* `checkpoint_blocks(blocks)` replaces each block's `forward` (an instance attribute, deleted again on
  exit) by a checkpoint that runs the block on copies of its inputs (the block may overwrite them), and
  recomputes it in backward under `copy_on_write_saved_tensors()`. With `protect=False` (blocks known
  not to write in place, such as a UNet's) it skips the copies and the protection: autograd's own
  version checks then still raise on any such write, so a wrong gradient is never silent. A block
  through which no gradient can flow (no input and no parameter requires grad) runs plainly: there
  is nothing to recompute.
* `protected_training(blocks, checkpointing, protect=...)` combines them. Nothing stays installed after it exits.

Gradients of parameters used inside checkpointed blocks are accumulated into `.grad` by the recompute,
so train with `loss.backward()` (not `torch.autograd.grad`), like any reentrant checkpoint.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree


class UnsafeInplaceError(RuntimeError):
    """A tensor saved for backward was overwritten in a way the protection could not undo."""


# Tensor methods whose trailing underscore does not mean "writes the tensor's data".
_NOT_DATA_WRITES = frozenset({"requires_grad_", "retain_grad", "share_memory_", "record_stream"})
_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                              "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                              "__ilshift__", "__irshift__", "__imatmul__"})


def _written_tensors(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes into: `self` of an in-place op, and `out=` arguments."""
    written = []
    if args and isinstance(args[0], torch.Tensor) and _writes_self(func):
        written.append(args[0])
    out = kwargs.get("out") if kwargs else None
    if isinstance(out, torch.Tensor):
        written.append(out)
    elif isinstance(out, (tuple, list)):
        written.extend(t for t in out if isinstance(t, torch.Tensor))
    return written


def _storage_key(t: torch.Tensor):
    try:
        # The storage's identity rather than its data pointer: the same for real tensors, and also right
        # for meta / fake tensors (whose data pointers are all 0), which the memory planner runs through.
        return t.untyped_storage()._cdata
    except Exception:  # tensor subclasses without a plain storage: version check only
        return None


def _version(t: torch.Tensor):
    try:
        return t._version
    except Exception:  # inference tensors carry no version counter
        return None


class _Saved:
    """One saved tensor: a reference and its version, or a copy taken before it was overwritten."""
    __slots__ = ("tensor", "version", "copy", "description", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()  # no reference cycle through grad_fn; shares the version counter
        self.version = _version(tensor)
        self.copy = None
        self.description = f"{tuple(tensor.shape)} {tensor.dtype}"


# func -> whether its name says it writes `self` (decided once per op: this mode sees every op, and
# its Python cost per op is most of what the protection costs).
_WRITES_SELF: dict = {}


def _writes_self(func) -> bool:
    known = _WRITES_SELF.get(func)
    if known is None:
        name = getattr(func, "__name__", "")
        known = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("_")
                                             and name not in _NOT_DATA_WRITES)
        _WRITES_SELF[func] = known
    return known


class _CopyOnWriteMode(TorchFunctionMode):
    def __init__(self, registry: dict, substitutions: Mapping[Callable, Callable]):
        super().__init__()
        self.registry = registry
        self.substitutions = substitutions
        self.copies = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.substitutions:
            replacement = self.substitutions.get(func)
            if replacement is not None:
                return replacement(*args, **(kwargs or {}))
        if not kwargs:
            if not (args and _writes_self(func) and isinstance(args[0], torch.Tensor)):
                return func(*args)  # the common case: an op that writes nothing
            kwargs = {}
        for target in _written_tensors(func, args, kwargs):
            key = _storage_key(target)
            holders = self.registry.get(key) if key is not None else None
            if not holders:
                continue
            for saved in list(holders):
                if saved.copy is None and saved.tensor is not None and saved.version == _version(saved.tensor):
                    saved.copy = saved.tensor.clone()
                    saved.tensor = None
                    self.copies += 1
            holders.clear()
        return func(*args, **kwargs)


class _Protection:
    """Statistics of one protected region (for benchmarks and tests)."""

    def __init__(self):
        self.saved = 0
        self.copies = 0


@contextlib.contextmanager
def copy_on_write_saved_tensors(substitutions: Mapping[Callable, Callable] | None = None):
    """Autograd-saved tensors survive later in-place ops in this region (copied on first write);
    any write the region could not intercept raises `UnsafeInplaceError` in backward.

    `substitutions` maps ops (as a `TorchFunctionMode` sees them, e.g. `torch.ops.lib.op`) to
    differentiable replacements used inside the region only."""
    registry: dict = {}
    stats = _Protection()

    def pack(t: torch.Tensor):
        saved = _Saved(t)
        key = _storage_key(t)
        if key is not None:
            registry.setdefault(key, weakref.WeakSet()).add(saved)
        stats.saved += 1
        return saved

    def unpack(saved: _Saved) -> torch.Tensor:
        if saved.copy is not None:
            return saved.copy
        if saved.version is not None and _version(saved.tensor) != saved.version:
            raise UnsafeInplaceError(
                f"a tensor saved for backward ({saved.description}) was overwritten in place by an op the "
                f"gradient protection could not intercept (version {saved.version} -> "
                f"{_version(saved.tensor)}); refusing to compute a wrong gradient.")
        return saved.tensor

    mode = _CopyOnWriteMode(registry, dict(substitutions or {}))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), mode:
            yield stats
    finally:
        stats.copies += mode.copies
        registry.clear()


@contextlib.contextmanager
def clone_stream_reads(blocks: Iterable[nn.Module]):
    """While one of `blocks` runs with gradients enabled, hand each of its direct submodules a copy of
    any tensor that shares storage with one of the block's own inputs.

    For blocks whose in-place writes all go into their inputs (residual streams) and whose submodules
    are the only readers that save them (a norm before each `x += ...`), this leaves every saved tensor
    intact at the price of exactly the copies copy-on-write would make. The assumption is not trusted:
    no saved-tensor hooks are installed, so autograd's own version check raises on any write into a
    saved tensor that this did not prevent. Hooks are removed on exit; the per-thread stream stack keeps
    other threads (sampling under no_grad) out of it."""
    local = threading.local()
    stats = _Protection()  # copies: block inputs copied for a submodule
    handles = []

    def stack():
        if not hasattr(local, "streams"):
            local.streams = []
        return local.streams

    def enter_block(module, args, kwargs):
        keys = None
        if torch.is_grad_enabled():
            keys = {_storage_key(t) for t in pytree.tree_leaves((args, kwargs))
                    if isinstance(t, torch.Tensor) and t.is_floating_point()}
            keys.discard(None)
        stack().append(keys)

    def leave_block(module, args, kwargs, output):
        stack().pop()

    def copy_streams(module, args, kwargs):
        streams = stack()
        keys = streams[-1] if streams else None
        if not keys or not torch.is_grad_enabled():
            return None
        changed = False

        def copy(x):
            nonlocal changed
            if isinstance(x, torch.Tensor) and _storage_key(x) in keys:
                changed = True
                stats.copies += 1
                return x.clone()
            return x
        new_args, new_kwargs = pytree.tree_map(copy, (args, kwargs))
        return (new_args, new_kwargs) if changed else None

    try:
        for block in blocks:
            handles.append(block.register_forward_pre_hook(enter_block, with_kwargs=True))
            handles.append(block.register_forward_hook(leave_block, with_kwargs=True, always_call=True))
            for child in block.children():
                handles.append(child.register_forward_pre_hook(copy_streams, with_kwargs=True))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


_PROTECTIONS = {True: "copy_on_write", False: "none", "copy_on_write": "copy_on_write", "streams": "streams",
                "none": "none"}


def _protection(protect) -> str:
    try:
        return _PROTECTIONS[protect]
    except (KeyError, TypeError):
        raise ValueError(f"protect must be one of True/'copy_on_write', 'streams', False/'none'; got {protect!r}")


def _clone_input(t):
    return t.clone() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state():
    state = {}
    for device in _AUTOCAST_DEVICES:
        try:
            state[device] = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        except Exception:
            pass
    return state


@contextlib.contextmanager
def _autocast(state):
    with contextlib.ExitStack() as stack:
        for device, (enabled, dtype) in state.items():
            stack.enter_context(torch.autocast(device_type=device, dtype=dtype, enabled=enabled))
        yield


def _same(t):
    return t


# Marks where a checkpointed block's output had a tensor (a block may also return None, e.g. SD3's last
# joint block for its finished context stream).
_TENSOR_SLOT = object()


class _BlockCheckpoint(torch.autograd.Function):
    """Forward without keeping activations; backward recomputes the block with saved tensors protected.

    Inputs: (run, box, anchor, *tensors). `run(tensors)` calls the block; `box` carries non-tensor
    state both ways (the substitutions and the protect flag in, the output structure out); `anchor` is
    an empty tensor that requires grad so that backward runs even when no input does (the block's own
    trainable weights still need it)."""

    @staticmethod
    def forward(ctx, run, box, anchor, *tensors):
        ctx.run, ctx.box = run, box
        ctx.autocast = _autocast_state()
        ctx.save_for_backward(*tensors)  # autograd checks their versions: a later overwrite raises
        copy = _same if box["protect"] == "none" else _clone_input
        with torch.no_grad():
            outputs = run([copy(t) for t in tensors])
        flat, box["out_spec"] = pytree.tree_flatten(outputs)
        box["out_values"] = [_TENSOR_SLOT if isinstance(o, torch.Tensor) else o for o in flat]
        return tuple(o for o in flat if isinstance(o, torch.Tensor))

    @staticmethod
    def backward(ctx, *grads):
        leaves = [t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t.detach()
                  for t in ctx.saved_tensors]
        protect = ctx.box["protect"] != "none"
        region = (copy_on_write_saved_tensors if ctx.box["protect"] == "copy_on_write" else _substituted)(
            ctx.box["substitutions"])
        with torch.enable_grad(), _autocast(ctx.autocast), region:  # copies made here stay on the graph
            outputs = ctx.run([_clone_input(t) for t in leaves] if protect else leaves, recompute=True)
        flat = [o for o in pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor)]
        pairs = [(o, g) for o, g in zip(flat, grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, *[leaf.grad if leaf.requires_grad else None for leaf in leaves])


_recompute = threading.local()


def _recomputing() -> bool:
    return getattr(_recompute, "depth", 0) > 0


@contextlib.contextmanager
def _recomputation():
    _recompute.depth = getattr(_recompute, "depth", 0) + 1
    try:
        yield
    finally:
        _recompute.depth -= 1


def _checkpointed_forward(block: nn.Module, original: Callable, substitutions: Mapping, protect: str):
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled() or _recomputing():
            return original(*args, **kwargs)
        flat, tree = pytree.tree_flatten((args, kwargs))
        slots = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        if not any(flat[i].requires_grad for i in slots) and not any(p.requires_grad for p in block.parameters()):
            # No gradient can flow through this call (e.g. a UNet's first blocks under a LoRA that
            # starts later): autograd saves nothing for it, so there is nothing to recompute.
            return original(*args, **kwargs)

        def run(tensors, recompute=False):
            filled = list(flat)
            for i, t in zip(slots, tensors):
                filled[i] = t
            call_args, call_kwargs = pytree.tree_unflatten(filled, tree)
            if not recompute:
                return original(*call_args, **call_kwargs)  # already inside block.__call__
            # The recomputation goes through block.__call__ so that the block's hooks (block swap's
            # weight streaming among them) run around it as they did around the forward.
            with _recomputation():
                return block(*call_args, **call_kwargs)

        box = {"substitutions": substitutions, "protect": protect}
        anchor = torch.empty(0, requires_grad=True)
        outs = iter(_BlockCheckpoint.apply(run, box, anchor, *[flat[i] for i in slots]))
        rebuilt = [next(outs) if value is _TENSOR_SLOT else value for value in box["out_values"]]
        return pytree.tree_unflatten(rebuilt, box["out_spec"])

    return forward


@contextlib.contextmanager
def op_substitutions(substitutions: Mapping[Callable, Callable]):
    """Only the op substitutions of the protection (no saved-tensor handling), for this thread."""
    with _CopyOnWriteMode({}, dict(substitutions)):
        yield


def _substituted(substitutions: Mapping[Callable, Callable]):
    """op_substitutions, or nothing at all (no per-op Python dispatch) when there are none."""
    return op_substitutions(substitutions) if substitutions else contextlib.nullcontext()


@contextlib.contextmanager
def checkpoint_blocks(blocks: Iterable[nn.Module], substitutions: Mapping[Callable, Callable] | None = None,
                      protect: bool | str = True):
    """Gradient-checkpoint each block, with its inputs copied and its saved tensors protected (with
    `protect`: True / "copy_on_write" recomputes under `copy_on_write_saved_tensors`, "streams" under
    the caller's `clone_stream_reads`; False / "none", for blocks that never write in place, is plain
    recomputation that autograd's version checks still guard).

    Installs an instance-level `forward` on each block and removes it on exit (also on errors)."""
    subs = dict(substitutions or {})
    protect = _protection(protect)
    installed = []
    try:
        for block in blocks:
            if "forward" in vars(block):
                raise RuntimeError(f"{type(block).__name__} already has an instance-level forward; "
                                   "refusing to stack checkpoint wrappers")
            block.forward = _checkpointed_forward(block, type(block).forward.__get__(block), subs, protect)
            installed.append(block)
        yield
    finally:
        for block in installed:
            vars(block).pop("forward", None)


@contextlib.contextmanager
def protected_training(blocks: Iterable[nn.Module], checkpointing: bool,
                       substitutions: Mapping[Callable, Callable] | None = None, protect: bool | str = True):
    """Run forward passes whose gradients are correct despite in-place ops on saved tensors.

    `protect`:
    * True / "copy_on_write": all saved tensors of the region are copy-on-write protected (any model);
    * "streams": `clone_stream_reads` on the blocks, for blocks whose in-place writes go only into their
      own inputs (ComfyUI's Flux-style blocks): no per-op dispatch;
    * False / "none": for models known not to write in place into saved tensors (SD UNets): only the
      checkpointing and the substitutions are installed.
    Autograd's own version checks (or the copy-on-write unpack check) turn any write the chosen
    protection does not handle into an error, never into a wrong gradient.

    With `checkpointing`, each of `blocks` is also checkpointed (activations recomputed in backward,
    under the same protection). Call `loss.backward()` inside or after the region; nothing stays
    installed once it exits. Yields the region's statistics (copies made; None without protection)."""
    protect = _protection(protect)
    blocks = list(blocks)
    with contextlib.ExitStack() as stack:
        if checkpointing:
            stack.enter_context(checkpoint_blocks(blocks, substitutions, protect))
        if protect == "copy_on_write":
            yield stack.enter_context(copy_on_write_saved_tensors(substitutions))
            return
        stats = stack.enter_context(clone_stream_reads(blocks)) if protect == "streams" else None
        stack.enter_context(_substituted(dict(substitutions or {})))
        yield stats


@contextlib.contextmanager
def clone_all_saved_tensors(substitutions: Mapping[Callable, Callable] | None = None):
    """A known-correct but expensive reference: every tensor autograd saves is copied when saved.
    For tests and benchmarks; it cannot be combined with checkpointing."""
    def pack(t):
        return t.detach().clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            _CopyOnWriteMode({}, dict(substitutions or {})):
        yield
