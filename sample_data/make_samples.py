"""Regenerates sample_data/stamps: small procedural "stamp" images, half with caption sidecars.

The demo trains on these; they are generated (not photographs) so the repository ships no third-party
images. Run: python sample_data/make_samples.py
"""
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent / "stamps"
COLOURS = [("red", (200, 40, 40)), ("blue", (40, 70, 200)), ("green", (40, 150, 60)), ("orange", (230, 130, 30))]
SHAPES = ["circle", "star", "square"]


def star(cx, cy, r):
    return [(cx + (r if i % 2 == 0 else r / 2.2) * math.cos(math.pi / 2 + i * math.pi / 5),
             cy - (r if i % 2 == 0 else r / 2.2) * math.sin(math.pi / 2 + i * math.pi / 5)) for i in range(10)]


def main():
    rng = random.Random(7)
    HERE.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        name, colour = COLOURS[i % len(COLOURS)]
        shape = SHAPES[i % len(SHAPES)]
        img = Image.new("RGB", (64, 64), (245, 240, 225))
        d = ImageDraw.Draw(img)
        d.rectangle([3, 3, 60, 60], outline=colour, width=3)
        cx, cy, r = 32 + rng.randint(-4, 4), 32 + rng.randint(-4, 4), rng.randint(14, 20)
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif shape == "star":
            d.polygon(star(cx, cy, r), fill=colour)
        else:
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        img.save(HERE / f"stamp_{i:02d}.png")
        if i % 2 == 0:
            (HERE / f"stamp_{i:02d}.txt").write_text(f"a {name} {shape} postage stamp, [trigger]\n", encoding="utf-8")


if __name__ == "__main__":
    main()
