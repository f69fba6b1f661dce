"""Labelled images (PIL only): sample previews with a caption, a strip of previews under the loss curve,
and a grid of samples with row and column labels. Images come and go as float arrays in [0, 1],
[H, W, 3] (the layout of ComfyUI's IMAGE), so these functions know nothing of ComfyUI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .files import write_new_file

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
LINE = 14  # height of one line of PIL's default bitmap font, with spacing


def to_pil(image: np.ndarray) -> Image.Image:
    """[H, W, 3] float in [0, 1] -> RGB PIL image (rounded the way ComfyUI's SaveImage rounds)."""
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) * 255.0, 0, 255).astype(np.uint8), "RGB")


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def text_width(line: str) -> int:
    return int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(line))


def text_band(width: int, lines: list[str]) -> Image.Image:
    """The lines on white, at least `width` wide and as wide as the longest line needs."""
    width = max([width] + [8 + text_width(line) for line in lines])
    band = Image.new("RGB", (width, 6 + LINE * len(lines)), BACKGROUND)
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((4, 3 + LINE * i), line, fill=INK)
    return band


def stack(images: list[Image.Image]) -> Image.Image:
    """Images one under the other, left-aligned, on white."""
    width = max(i.width for i in images)
    out = Image.new("RGB", (width, sum(i.height for i in images)), BACKGROUND)
    y = 0
    for image in images:
        out.paste(image, (0, y))
        y += image.height
    return out


def captioned(image: Image.Image, *lines: str) -> Image.Image:
    """The image with its caption lines in a white band underneath (the image's pixels unchanged)."""
    return stack([image, text_band(image.width, list(lines))])


def fit(image: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


def evenly_chosen(items: list, at_most: int) -> list:
    """At most `at_most` items spread over the list, always with the first and the last."""
    if len(items) <= at_most:
        return list(items)
    picks = sorted({round(i * (len(items) - 1) / (at_most - 1)) for i in range(at_most)})
    return [items[i] for i in picks]


def preview_strip(previews: list[tuple[str, Image.Image]], width: int, at_most: int = 8) -> Image.Image:
    """Labelled thumbnails side by side, scaled to fill `width` (for under the loss curve)."""
    chosen = evenly_chosen(previews, at_most)
    side = max(16, width // max(1, len(chosen)))
    cells = [captioned(fit(image, side), label) for label, image in chosen]
    out = Image.new("RGB", (max(width, sum(c.width for c in cells)), max(c.height for c in cells)), BACKGROUND)
    x = 0
    for cell in cells:
        out.paste(cell, (x, 0))
        x += cell.width
    return out


def labelled_grid(cells: list[list[Image.Image]], row_labels: list[str], column_labels: list[list[str]],
                  gap: int = 4) -> Image.Image:
    """cells[r][c] in a grid; each row's label on its left, each column's label lines above it.
    Cells of one grid have one size (a sampler's images at one latent size)."""
    if not cells or not cells[0]:
        raise ValueError("a grid needs at least one cell")
    cw, ch = cells[0][0].size
    label_w = 8 + max(text_width(label) for label in row_labels)
    header_h = 6 + LINE * max(len(lines) for lines in column_labels)
    columns = len(cells[0])
    out = Image.new("RGB", (label_w + columns * (cw + gap), header_h + len(cells) * (ch + gap)), BACKGROUND)
    draw = ImageDraw.Draw(out)
    for c, lines in enumerate(column_labels):
        for k, line in enumerate(lines):
            draw.text((label_w + c * (cw + gap) + 2, 3 + LINE * k), line, fill=INK)
    for r, row in enumerate(cells):
        top = header_h + r * (ch + gap)
        draw.text((4, top + ch // 2 - LINE // 2), row_labels[r], fill=INK)
        for c, cell in enumerate(row):
            out.paste(cell, (label_w + c * (cw + gap), top))
    return out


def save_image_new(path: Path, frames: list[Image.Image], fps: float = 8.0) -> Path:
    """One frame as PNG, several as an animated (lossless) WebP; atomic, never over an existing file."""
    def write(tmp: Path) -> None:
        if len(frames) == 1:
            frames[0].save(tmp, format="PNG")
        else:
            frames[0].save(tmp, format="WEBP", save_all=True, append_images=frames[1:],
                           duration=round(1000 / fps), loop=0, lossless=True)
    return write_new_file(path, write)
