"""ComfyUI's real cancel, as the queue's Cancel button triggers it: `interrupt_current_processing()`, which
`comfy/ops.py` then raises from inside the next op of the model's forward (or the progress bar at its next
update). These helpers only choose *when* to press it; nothing of the pack is patched."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager


def is_fake(value) -> bool:
    from torch._subclasses.fake_tensor import is_fake as fake
    import torch
    return isinstance(value, torch.Tensor) and fake(value)


def _mm():
    import comfy.model_management
    return comfy.model_management


@contextmanager
def interrupt_in_forward(module, call: int):
    """Press Cancel at the start of `module`'s forward number `call`: ComfyUI's ops raise the interrupt
    inside that forward, mid-step."""
    count = {"n": 0}

    def hook(mod, args):
        if any(is_fake(a) for a in args):
            return  # the memory planner's measured step (fake tensors) is not a training step
        count["n"] += 1
        if count["n"] == call:
            _mm().interrupt_current_processing(True)
    handle = module.register_forward_pre_hook(hook)
    try:
        yield count
    finally:
        handle.remove()
        _mm().interrupt_current_processing(False)


@contextmanager
def interrupt_at_progress(step: int):
    """Press Cancel when the progress bar first reports `step` or later (as a UI watching the bar would;
    ComfyUI 0.33 throttles bar updates, so a step may not be reported): between steps. Yields
    {"pressed_at": the step it showed}."""
    import comfy.utils
    previous = comfy.utils.PROGRESS_BAR_HOOK
    pressed = {"pressed_at": None}

    def hook(value, total, preview, node_id=None):
        if value >= step and pressed["pressed_at"] is None:
            pressed["pressed_at"] = value
            _mm().interrupt_current_processing(True)
        if previous is not None:
            previous(value, total, preview, node_id) if node_id is not None else previous(value, total, preview)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield pressed
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        _mm().interrupt_current_processing(False)


@contextmanager
def interrupt_from_thread(when):
    """Press Cancel from another thread (as the server's /interrupt handler does) once `when()` is true,
    at whatever moment of the step that happens to be."""
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if when():
                _mm().interrupt_current_processing(True)
                return
            time.sleep(0.002)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        _mm().interrupt_current_processing(False)


def is_comfy_interrupt(exc: BaseException) -> bool:
    return isinstance(exc, _mm().InterruptProcessingException)
