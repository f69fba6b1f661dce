import random

import pytest

from comfyui_dojo.training.datasets import (BucketConfig, DatasetConfig, DatasetError, bucket_for, fit,
                                            make_batches, make_buckets, nearest_bucket, scan_folder)
from datasets_media import write_image


def test_buckets_respect_step_area_and_side_limits():
    buckets = make_buckets(512, 64, 256, 1024)
    assert (512, 512) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert 256 <= h <= 1024 and 256 <= w <= 1024
        assert h * w <= 512 * 512
        assert h * w >= 0.75 * 512 * 512  # tallest height per width: close to the target area
    assert (768, 320) in buckets and (320, 768) in buckets  # portrait and landscape both present


def test_nearest_bucket_matches_aspect_ratio():
    buckets = make_buckets(512, 64, 256, 1024)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    h, w = nearest_bucket((600, 1200), buckets)  # 2:1 landscape
    assert 1.8 <= w / h <= 2.2


def test_no_upscale_keeps_small_images_at_their_own_size():
    config = BucketConfig(resolution=512, step=64, min_side=256, max_side=1024, no_upscale=True)
    buckets = make_buckets(512, 64, 256, 1024)
    assert bucket_for((300, 400), config, buckets) == (256, 384)
    upscaled = BucketConfig(resolution=512, step=64, min_side=256, max_side=1024)
    assert bucket_for((300, 400), upscaled, buckets) == nearest_bucket((300, 400), buckets)
    assert bucket_for((40, 400), config, buckets) is None  # not even one step tall


def test_fit_covers_the_bucket_and_centres_the_crop():
    resize_to, crop = fit((400, 600), (256, 256), random_crop=False, rng=random.Random(0))
    assert resize_to == (256, 384)
    assert crop == (0, 64, 256, 256)


def test_random_crop_is_seeded():
    offsets = {fit((400, 800), (256, 256), True, random.Random(seed))[1] for seed in range(10)}
    assert len(offsets) > 3
    assert fit((400, 800), (256, 256), True, random.Random(4)) == fit((400, 800), (256, 256), True, random.Random(4))


def test_batches_never_mix_keys_and_cover_every_item():
    items = [("a", i) for i in range(7)] + [("b", i) for i in range(5)] + [("c", 0)]
    batches = make_batches(items, 3, key=lambda x: x[0], rng=random.Random(0))
    assert all(len({k for k, _ in batch}) == 1 for batch in batches)
    assert sorted(x for batch in batches for x in batch) == sorted(items)
    assert all(len(b) == 3 for b in make_batches(items, 3, key=lambda x: x[0], rng=random.Random(0), drop_last=True))
    assert make_batches(items, 3, lambda x: x[0], random.Random(9)) == make_batches(items, 3, lambda x: x[0], random.Random(9))


def test_dataset_batches_group_by_bucket_and_expand_repeats(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"wide{i}.png", size=(64, 128))
        write_image(tmp_path / "2_tall" / f"tall{i}.png", size=(128, 64))
    config = DatasetConfig(buckets=BucketConfig(resolution=64, step=16, min_side=16, max_side=128))
    dataset = scan_folder(tmp_path, config)
    assert len(dataset.bucket_counts()) == 2
    batches = dataset.batches(batch_size=2)
    assert all(len({item.bucket for item in batch}) == 1 for batch in batches)
    assert sum(len(b) for b in batches) == 3 + 2 * 3
    assert dataset.batches(2, epoch=1) == dataset.batches(2, epoch=1)  # seeded per epoch


def test_bad_bucket_config_is_refused():
    with pytest.raises(DatasetError, match="min_side"):
        BucketConfig(min_side=1024, max_side=512)
