"""A loss curve as an image (PIL only): raw per-step loss in light grey, a moving average on top."""
from __future__ import annotations

from PIL import Image, ImageDraw


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def render_loss_plot(losses: list[float], width: int = 640, height: int = 320, title: str = "loss") -> Image.Image:
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 24, height - 28
    draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
    if not losses:
        draw.text((left + 8, top + 8), "no steps yet", fill="black")
        return img
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0

    def xy(i, v):
        x = left + (right - left) * (i / max(1, len(losses) - 1))
        return x, bottom - (bottom - top) * ((v - lo) / span)

    smooth = moving_average(losses, max(1, len(losses) // 20))
    if len(losses) > 1:
        draw.line([xy(i, v) for i, v in enumerate(losses)], fill=(200, 200, 200), width=1)
        draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(30, 90, 200), width=2)
    draw.text((left, 6), f"{title}: {len(losses)} steps, last {smooth[-1]:.4f}", fill="black")
    draw.text((4, top), f"{hi:.3g}", fill="black")
    draw.text((4, bottom - 10), f"{lo:.3g}", fill="black")
    draw.text((left, bottom + 8), "step 1", fill="black")
    draw.text((right - 60, bottom + 8), f"step {len(losses)}", fill="black")
    return img
