"""A contact sheet of dataset items: each thumbnail with its caption written under it."""
from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont


def tensor_to_pil(frame: torch.Tensor) -> Image.Image:
    """[C, H, W] in [-1, 1] -> an RGB image."""
    array = ((frame.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


def caption_grid(entries: list[tuple[Image.Image, str]], cell: int = 160, columns: int = 4,
                 text_lines: int = 4) -> Image.Image:
    """Thumbnails fitted into `cell`-pixel squares, captions (wrapped, at most `text_lines` lines)
    under each, `columns` per row, on a dark background."""
    if not entries:
        return Image.new("RGB", (cell, cell), (32, 32, 32))
    font = ImageFont.load_default()
    line_height = 12
    text_height = text_lines * line_height + 6
    columns = max(1, min(columns, len(entries)))
    rows = -(-len(entries) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_height)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    chars_per_line = max(8, cell // 6)
    for i, (image, caption) in enumerate(entries):
        x0, y0 = (i % columns) * cell, (i // columns) * (cell + text_height)
        thumb = image.copy()
        thumb.thumbnail((cell - 4, cell - 4))
        sheet.paste(thumb, (x0 + (cell - thumb.width) // 2, y0 + (cell - thumb.height) // 2))
        lines = textwrap.wrap(caption or "(empty caption)", chars_per_line)
        if len(lines) > text_lines:
            lines = lines[:text_lines]
            lines[-1] = lines[-1][: chars_per_line - 3] + "..."
        for j, line in enumerate(lines):
            draw.text((x0 + 3, y0 + cell + 2 + j * line_height), line, fill=(230, 230, 230), font=font)
    return sheet
