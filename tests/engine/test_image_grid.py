"""Labelled images for previews and grids: cells and samples are placed pixel for pixel, labels are drawn
outside them and never cut, and sample files are written atomically, never over an existing one."""
import numpy as np
import pytest
from PIL import Image

from comfyui_dojo.training.image_grid import (captioned, evenly_chosen, labelled_grid, preview_strip,
                                              save_image_new, to_array, to_pil)


def noise_image(seed, size=(24, 16)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def test_round_trip_and_rounding():
    a = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
    back = to_array(to_pil(a))
    assert back.shape == a.shape and np.abs(back - a).max() <= 1 / 255 + 1e-6
    assert np.array_equal(np.asarray(to_pil(back)), np.asarray(to_pil(a)))


def test_grid_places_every_cell_unchanged_with_labels_outside():
    cells = [[noise_image(r * 10 + c) for c in range(3)] for r in range(2)]
    grid = np.asarray(labelled_grid(cells, ["step 250", "step 500"], [["strength 0", "seed 1"]] * 3, gap=4))
    label_w = grid.shape[1] - 3 * (24 + 4)
    header_h = grid.shape[0] - 2 * (16 + 4)
    assert label_w > 30 and header_h > 20
    for r in range(2):
        for c in range(3):
            y, x = header_h + r * 20, label_w + c * 28
            assert np.array_equal(grid[y:y + 16, x:x + 24], np.asarray(cells[r][c]))
    assert (grid[:header_h] < 128).any() and (grid[header_h:, :label_w] < 128).any()
    with pytest.raises(ValueError):
        labelled_grid([], [], [])


def test_caption_keeps_the_pixels_and_is_never_cut():
    image = noise_image(1)
    out = captioned(image, "step 1000/1000  loss 0.1234")
    assert np.array_equal(np.asarray(out)[:16, :24], np.asarray(image))
    assert out.width > 24 * 4  # widened for the text, not cut at the image's width


def test_strip_spreads_over_the_run():
    assert evenly_chosen(list(range(20)), 5) == [0, 5, 10, 14, 19]
    assert evenly_chosen([1, 2], 8) == [1, 2]
    strip = preview_strip([(f"step {i}", noise_image(i)) for i in range(12)], 400, at_most=4)
    assert strip.width >= 400 and strip.height > 16


def test_sample_files_are_new_png_or_animated_webp(tmp_path):
    frames = [noise_image(i) for i in range(3)]
    png = save_image_new(tmp_path / "step_000000.png", frames[:1])
    webp = save_image_new(tmp_path / "step_000000.webp", frames)
    with Image.open(png) as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(frames[0]))
    with Image.open(webp) as img:
        assert img.n_frames == 3
        img.seek(2)
        assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(frames[2]))  # lossless
    with pytest.raises(FileExistsError):
        save_image_new(png, frames[1:2])
    with Image.open(png) as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(frames[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000.png", "step_000000.webp"]
