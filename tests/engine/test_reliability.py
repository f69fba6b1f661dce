"""Reliability cases of the engine (issue 8) that are not already covered beside their feature:
degenerate and oversized images, and a full disk while checkpointing."""
import errno

import pytest
import torch
from PIL import Image

from comfyui_dojo.training.checkpoints import CheckpointError, latest_checkpoint, save_checkpoint
from comfyui_dojo.training.datasets import DatasetConfig, DatasetError, scan_folder


def skipped_reasons(dataset):
    return {path.name: reason for path, reason in dataset.skipped}


def test_a_one_pixel_image_is_skipped_with_its_size(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "fine.png")
    with pytest.warns(UserWarning, match="dot.png"):
        dataset = scan_folder(tmp_path, DatasetConfig())
    assert [i.path.name for i in dataset.items] == ["fine.png"]
    assert "too small (1x1)" in skipped_reasons(dataset)["dot.png"]


def test_a_huge_image_is_refused_from_its_header_without_decoding(tmp_path):
    # 20000 x 5001 = 100.02 MP: just over the limit. A 1-bit image keeps this test's own memory small.
    Image.new("1", (20000, 5001)).save(tmp_path / "panorama.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "fine.png")
    with pytest.warns(UserWarning, match="panorama.png"):
        dataset = scan_folder(tmp_path, DatasetConfig())
    reason = skipped_reasons(dataset)["panorama.png"]
    assert "too large to decode safely (20000x5001" in reason and "downscale" in reason


def test_a_very_wide_image_within_the_limit_is_cropped_to_a_bucket_not_refused(tmp_path):
    Image.new("RGB", (20000, 300), (10, 20, 30)).save(tmp_path / "strip.png")
    dataset = scan_folder(tmp_path, DatasetConfig())
    item, = dataset.items
    h, w, t = item.bucket
    assert w <= dataset.config.buckets.max_side and item.load().shape == (1, 3, h, w)


def test_a_folder_of_only_unusable_images_is_an_error_not_an_empty_dataset(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "a.png")
    Image.new("RGB", (2, 3)).save(tmp_path / "b.png")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="every file"):
        scan_folder(tmp_path, DatasetConfig())


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    first = save_checkpoint(tmp_path, 10, [1.0], {"w": param.detach()}, optimizer, scheduler, {"seed": 0})

    import comfyui_dojo.training.checkpoints as checkpoints

    def disk_full(path, tensors, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoints, "save_safetensors_new", disk_full)
    with pytest.raises(CheckpointError, match=r"step 20.*No space left on device.*step_000010 is kept"):
        save_checkpoint(tmp_path, 20, [1.0, 0.5], {"w": param.detach()}, optimizer, scheduler, {"seed": 0})
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000010"]  # no half-written step_000020
