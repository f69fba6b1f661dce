"""Still images: read a size cheaply, decode to RGB by fixed rules, turn into a [-1, 1] tensor.

Conversion rules (applied after EXIF orientation):
- alpha (RGBA, LA, PA, palette with transparency): composited onto WHITE. Most cut-outs are drawn
  on white, and black would teach dark halos; a user who wants another background flattens first.
- 16-bit greyscale (modes I;16*, and I which PNG decoders use for 16-bit): scaled by 1/257 to 8 bits
  (Pillow's own I -> L conversion clips at 255 instead, which turns most of the image white).
- palette (P), 1-bit, L, CMYK, YCbCr: converted to RGB by Pillow.
- GIF: the first frame (animated GIFs are read as clips by `video.py` when clips are wanted).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})

_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # orientations that rotate by 90 degrees


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only (no pixel decode)."""
    with Image.open(path) as img:
        w, h = img.size
        # The base class reads EXIF from what the header parse found; PngImageFile.getexif() would decode
        # the whole image first when the eXIf chunk is not before the pixels (412 MB for a 108 MP PNG).
        orientation = Image.Image.getexif(img).get(_EXIF_ORIENTATION, 1)
    return (w, h) if orientation in _SWAPS_SIDES else (h, w)


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image by the module's rules (alpha onto white, 16-bit scaled, palette expanded)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img, dtype=np.float64)  # Pillow reads I;16 variants as native uint16
        return Image.fromarray(np.clip(values / 257.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Decode `path` fully (first frame for GIF), apply EXIF orientation, convert to RGB.

    Raises OSError / PIL errors for corrupt or truncated files; callers decide whether to skip.
    """
    with Image.open(path) as img:
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def resize_and_crop(img: Image.Image, size: tuple[int, int], crop: tuple[int, int]) -> Image.Image:
    """Resize `img` to `size` (h, w) then cut the bucket out at `crop` = (top, left, h, w)."""
    h, w = size
    if (img.height, img.width) != (h, w):
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    top, left, ch, cw = crop
    return img.crop((left, top, left + cw, top + ch))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [C, H, W] in [-1, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
