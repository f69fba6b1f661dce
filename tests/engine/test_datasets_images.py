import numpy as np
import pytest
from PIL import Image

from comfyui_dojo.training.datasets import (BucketConfig, DatasetConfig, image_size, load_rgb, scan_folder,
                                            to_rgb)
from datasets_media import write_image

SMALL_BUCKETS = BucketConfig(resolution=64, step=16, min_side=16, max_side=128)


@pytest.mark.parametrize("name", ["a.png", "b.jpg", "c.jpeg", "d.webp", "e.bmp", "f.gif", "g.PNG"])
def test_every_supported_image_format_is_scanned_and_loads(tmp_path, name):
    write_image(tmp_path / name, size=(48, 64), color=(0, 0, 255))
    dataset = scan_folder(tmp_path, DatasetConfig(buckets=SMALL_BUCKETS))
    (item,) = dataset.items
    frames = item.load()
    assert frames.shape == (1, 3, *item.bucket[:2])
    assert frames.dtype.is_floating_point and frames.min() >= -1 and frames.max() <= 1
    blue = frames[0, 2].mean()
    assert blue > 0.9 and frames[0, 0].mean() < -0.8  # colour survived, in [-1, 1]


def test_exif_orientation_is_applied_to_size_and_pixels(tmp_path):
    # Stored 64 wide x 32 high, with orientation 6 ("rotate 90 CW to view"): seen as 32 wide x 64 high.
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 32, 32))  # left half blue -> after rotation the top half is blue
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    assert image_size(path) == (64, 32)
    rgb = np.asarray(load_rgb(path)).astype(int)
    assert rgb.shape == (64, 32, 3)
    assert rgb[5, 16, 2] > 200 and rgb[58, 16, 0] > 200


def test_alpha_is_composited_onto_white(tmp_path):
    path = write_image(tmp_path / "a.png", color=(255, 0, 0, 0), mode="RGBA")  # fully transparent red
    assert np.asarray(load_rgb(path)).min() == 255
    half = write_image(tmp_path / "b.png", color=(0, 0, 0, 128), mode="RGBA")
    assert abs(int(np.asarray(load_rgb(half))[0, 0, 0]) - 127) <= 1


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    array = np.full((8, 8), 32768, np.uint16)  # mid grey in 16 bits
    path = tmp_path / "g16.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb[0, 0, 0]) - 128) <= 1


def test_mode_i_is_read_as_sixteen_bit_range():
    img = Image.fromarray(np.full((4, 4), 65535, np.int32), "I")
    assert np.asarray(to_rgb(img)).min() == 255


def test_palette_images_convert_with_their_colours_and_transparency(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    path = tmp_path / "p.png"
    palette.save(path)
    assert tuple(np.asarray(load_rgb(path))[0, 0]) == (10, 200, 30)
    transparent = tmp_path / "pt.png"
    palette.save(transparent, transparency=1)
    assert tuple(np.asarray(load_rgb(transparent))[0, 0]) == (255, 255, 255)


def test_gif_gives_its_first_frame_in_a_still_dataset(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 200, 0), (200, 0, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    rgb = np.asarray(load_rgb(path)).astype(int)
    assert rgb[0, 0, 1] > 150 and rgb[0, 0, 0] < 50
