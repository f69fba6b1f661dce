"""Training progress in ComfyUI's UI: the bar, the live loss as text, and the loss curve as preview."""
from __future__ import annotations

import logging
import time

from ..training.image_grid import stack
from ..training.loss_plot import moving_average, render_loss_plot
from . import comfy_compat as cc

log = logging.getLogger("comfyui-dojo")


class TrainingProgress:
    """Feed it every finished step; it reports at a humane rate and notices ComfyUI's cancel."""

    def __init__(self, total: int, label: str = "loss", text_every_s: float = 1.0, plot_every_s: float = 10.0):
        self.total = total
        self.label = label
        self.bar = cc.progress_bar(total)
        self.stop_requested = False
        self.losses: list[float] = []
        self.text_every_s, self.plot_every_s = text_every_s, plot_every_s
        self._last_text = self._last_plot = 0.0
        self.sample = None  # the latest preview sample (PIL), shown above the loss curve

    def show_sample(self, step: int, image) -> None:
        """Show a preview sample now, and above the loss curve in every later plot."""
        self.sample = image
        self._update(step, cc.preview_tuple(self._plot()))
        self._last_plot = time.monotonic()

    def _plot(self, losses=None):
        plot = render_loss_plot(self.losses if losses is None else losses, 512, 256, self.label)
        return plot if self.sample is None else stack([self.sample, plot])

    def start_at(self, step: int, losses: list[float]) -> None:
        """Continue a resumed run: its earlier losses and the bar at its step."""
        self.losses = list(losses)
        self._update(step, None)

    def on_step(self, step: int, loss: float, lr: float) -> None:
        """The training loop's per-step callback."""
        self.losses.append(loss)
        self.step(step, loss, self.losses)

    def step(self, step: int, loss: float, losses: list[float]) -> None:
        now = time.monotonic()
        preview = None
        if now - self._last_plot >= self.plot_every_s or step == self.total:
            preview = cc.preview_tuple(self._plot(losses))
            self._last_plot = now
        self._update(step, preview)
        if now - self._last_text >= self.text_every_s or step == self.total:
            smooth = moving_average(losses, min(len(losses), 20))[-1]
            text = f"step {step}/{self.total}  {self.label} {loss:.4f}  (avg {smooth:.4f})"
            cc.show_progress_text(text)
            log.info("Dojo: %s", text)
            self._last_text = now

    def _update(self, step, preview):
        try:
            self.bar.update_absolute(step, self.total, preview)
        except Exception as exc:  # ComfyUI's progress hook raises on cancel: finish this step, then stop
            if not cc.is_interrupt(exc):
                raise
            self.stop_requested = True

    def should_stop(self) -> bool:
        return self.stop_requested or cc.interrupt_requested()
