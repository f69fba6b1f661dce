"""Small images and clips written on the fly for the dataset tests."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image


def write_image(path: Path, size=(48, 64), color=(200, 30, 30), mode="RGB", **save_kwargs) -> Path:
    """An image of `size` (h, w), solid `color`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    Image.new(mode, (w, h), color).save(path, **save_kwargs)
    return path


def write_video(path: Path, frames=10, size=(48, 64), fps=24, codec=None) -> Path:
    """A clip whose frame i is solid grey level 20*i (so tests can tell frames apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = codec or {".webm": "libvpx"}.get(path.suffix, "mpeg4")
    h, w = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), min(255, 20 * i), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_gif(path: Path, frames=5, size=(24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    images = [Image.new("RGB", (w, h), (40 * i, 0, 0)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100)
    return path


def grey_level(frame_chw) -> float:
    """Mean of a [-1, 1] frame back in 0..255."""
    return float((frame_chw.mean() + 1) * 127.5)
