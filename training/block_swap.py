"""Block swap: keep only some transformer blocks on the compute device and stream the rest from the CPU.

Large video models do not fit on one accelerator together with their activations. `block_swap(blocks,
device, resident)` keeps the first `resident` blocks on `device` and parks the frozen weights of the
others on `offload_device` (the CPU). A forward pre-hook gives a parked block device copies of its
frozen weights just before it runs, and a forward hook puts the parked weights back right after, so at
most one parked block's weights are on the device at a time (plus what autograd still holds).

Design points:

* The parked `nn.Parameter` objects are never written while a block runs: the pre-hook substitutes a
  device copy in the module's parameter table and the post-hook restores the original object. Autograd
  keeps a reference to the copy it used, so backward is correct whether or not the block is
  checkpointed; with `grad_safety.checkpoint_blocks` the forward keeps nothing, and the recomputation in
  backward runs through the block's hooks again (see `grad_safety`), so the copy lives only while that
  block's backward runs. Without checkpointing, autograd keeps each block's copies until backward
  reaches it: correct, but the weights then saves little memory. Use it with checkpointing.
* Trainable parameters (those that require grad: the adapter's) are never moved or substituted: they
  stay where the optimizer and its state are.
* On entry the parked blocks' frozen tensors are moved to `offload_device` in place (outside any
  autograd graph) and the resident ones to `device`; on exit (also on errors) every tensor goes back to
  the device it came from and every hook is removed. Tensors already on the right device are not
  touched, so on a CPU-only machine the model's storage is unchanged throughout.
* Copies to the device are always real copies (`copy=True`), so the streaming path is exercised, and
  tested, even where device and offload device are both the CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass
class SwapStats:
    """What a block swap did (for tests and logs)."""
    swapped_blocks: int = 0
    loads: int = 0          # times a parked block's weights were copied to the device
    bytes_loaded: int = 0


def _frozen_tensors(block: nn.Module):
    """(module, table, name) of every frozen parameter and every buffer of `block`."""
    for module in block.modules():
        for name, p in module._parameters.items():
            if p is not None and not p.requires_grad:
                yield module, module._parameters, name
        for name, b in module._buffers.items():
            if b is not None:
                yield module, module._buffers, name


def _move_in_place(table: dict, name: str, device: torch.device) -> torch.device | None:
    """Move one parameter / buffer to `device` keeping its object; returns its old device if moved."""
    t = table[name]
    if t.device == device:
        return None
    old = t.device
    with torch.no_grad():
        if isinstance(t, nn.Parameter):
            t.data = t.data.to(device)
        else:
            table[name] = t.to(device)
    return old


@contextlib.contextmanager
def block_swap(blocks: Sequence[nn.Module], device: torch.device | str, resident: int,
               offload_device: torch.device | str = "cpu", non_blocking: bool = False):
    """Keep `blocks[:resident]` on `device`; stream the frozen weights of the others from `offload_device`
    for each of their forward passes (also the recomputations of gradient checkpointing).

    `resident >= len(blocks)` swaps nothing (but still places every block on `device`). Yields a
    `SwapStats`. Everything is restored on exit."""
    device, offload_device = torch.device(device), torch.device(offload_device)
    if resident < 0:
        raise ValueError(f"resident blocks must be >= 0 (got {resident})")
    blocks = list(blocks)
    parked = blocks[resident:]
    stats = SwapStats(swapped_blocks=len(parked))
    moved: list[tuple[dict, str, torch.device]] = []
    handles = []

    def pre_hook(module, args):
        state = module.__dict__.setdefault("_dojo_swap_stack", [])
        substituted = []
        for _, table, name in _frozen_tensors(module):
            original = table[name]
            copy = original.detach().to(device, copy=True, non_blocking=non_blocking)
            table[name] = nn.Parameter(copy, requires_grad=False) if isinstance(original, nn.Parameter) else copy
            substituted.append((table, name, original))
            stats.bytes_loaded += copy.numel() * copy.element_size()
        state.append(substituted)
        stats.loads += 1

    def post_hook(module, args, output):
        for table, name, original in reversed(module.__dict__["_dojo_swap_stack"].pop()):
            table[name] = original

    try:
        for block in blocks:
            target = device if block not in parked else offload_device
            for _, table, name in _frozen_tensors(block):
                old = _move_in_place(table, name, target)
                if old is not None:
                    moved.append((table, name, old))
        for block in parked:
            handles.append(block.register_forward_pre_hook(pre_hook))
            handles.append(block.register_forward_hook(post_hook, always_call=True))
        yield stats
    finally:
        for h in handles:
            h.remove()
        for block in parked:
            # A forward that raised between the hooks (always_call restores it) leaves an empty stack.
            for substituted in reversed(block.__dict__.pop("_dojo_swap_stack", [])):
                for table, name, original in reversed(substituted):
                    table[name] = original
        for table, name, old in reversed(moved):
            _move_in_place(table, name, old)
