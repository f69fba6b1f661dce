import os

import pytest
import torch

from comfyui_dojo.training.datasets import (BucketConfig, DatasetConfig, DatasetError, DatasetWarning,
                                            scan_folder)
from datasets_media import write_image

SMALL = DatasetConfig(buckets=BucketConfig(resolution=64, step=16, min_side=16, max_side=128))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=r"nope.*does not exist"):
        scan_folder(tmp_path / "nope")


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="is empty"):
        scan_folder(tmp_path)


def test_folder_without_supported_files_is_a_clear_error(tmp_path):
    (tmp_path / "notes.md").write_text("hi")
    (tmp_path / "model.safetensors").write_bytes(b"\0")
    with pytest.raises(DatasetError, match=r"no supported files.*\.png"):
        scan_folder(tmp_path)


def test_kohya_repeat_folders_set_repeats(tmp_path):
    write_image(tmp_path / "root.png")
    write_image(tmp_path / "10_cat" / "c.png")
    write_image(tmp_path / "plain" / "p.png")
    repeats = {item.path.name: item.repeats for item in scan_folder(tmp_path, SMALL).items}
    assert repeats == {"root.png": 1, "c.png": 10, "p.png": 1}


def test_duplicate_stems_name_both_files(tmp_path):
    write_image(tmp_path / "x.png")
    write_image(tmp_path / "x.jpg")
    with pytest.raises(DatasetError, match=r"x\.jpg.*x\.png|x\.png.*x\.jpg"):
        scan_folder(tmp_path, SMALL)


def test_corrupt_and_truncated_images_are_skipped_with_a_warning(tmp_path):
    write_image(tmp_path / "good.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    full = write_image(tmp_path / "cut.jpg", size=(64, 64)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    with pytest.warns(DatasetWarning) as caught:
        dataset = scan_folder(tmp_path, SMALL)
    assert [item.path.name for item in dataset.items] == ["good.png"]
    assert sorted(p.name for p, _ in dataset.skipped) == ["cut.jpg", "garbage.png"]
    messages = " ".join(str(w.message) for w in caught)
    assert "garbage.png" in messages and "cut.jpg" in messages
    assert dataset.warnings and all(isinstance(m, str) for m in dataset.warnings)


def test_caption_without_image_warns_naming_it(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "orphan.txt").write_text("lonely")
    with pytest.warns(DatasetWarning, match="orphan.txt"):
        dataset = scan_folder(tmp_path, SMALL)
    assert any("orphan.txt" in m for m in dataset.warnings)


def test_non_utf8_caption_stops_the_scan_naming_the_file(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DatasetError, match=r"a\.txt"):
        scan_folder(tmp_path, SMALL)


def test_every_file_failing_is_an_error_not_an_empty_dataset(tmp_path):
    (tmp_path / "a.png").write_bytes(b"broken")
    (tmp_path / "b.jpg").write_bytes(b"broken too")
    with pytest.warns(DatasetWarning), pytest.raises(DatasetError, match="every file"):
        scan_folder(tmp_path, SMALL)


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    outside = write_image(tmp_path / "elsewhere" / "secret.png")
    root = tmp_path / "data"
    write_image(root / "ok.png")
    os.symlink(outside, root / "link.png")
    with pytest.raises(DatasetError, match=r"link\.png.*outside"):
        scan_folder(root, SMALL)


def test_symlinked_folder_out_of_the_folder_is_refused(tmp_path):
    write_image(tmp_path / "elsewhere" / "secret.png")
    root = tmp_path / "data"
    write_image(root / "ok.png")
    os.symlink(tmp_path / "elsewhere", root / "5_linked")
    with pytest.raises(DatasetError, match=r"5_linked.*outside"):
        scan_folder(root, SMALL)


def test_symlink_inside_the_folder_is_fine(tmp_path):
    write_image(tmp_path / "ok.png")
    os.symlink(tmp_path / "ok.png", tmp_path / "again.png")
    assert len(scan_folder(tmp_path, SMALL).items) == 2


def test_items_are_lazy_and_load_to_their_bucket(tmp_path):
    write_image(tmp_path / "a.png", size=(100, 50))
    (item,) = scan_folder(tmp_path, SMALL).items
    assert not any(isinstance(v, torch.Tensor) for v in vars(item).values())
    frames = item.load()
    h, w, t = item.bucket
    assert frames.shape == (t, 3, h, w) == (1, 3, h, w)
    assert h > w


def test_scanning_forty_images_without_verify_decodes_no_pixels(tmp_path, monkeypatch):
    import comfyui_dojo.training.datasets.scan as scan_module
    for i in range(40):
        write_image(tmp_path / f"{i:02}.png", size=(96, 128))
    verified = scan_folder(tmp_path, SMALL)

    def no_decoding(path):
        raise AssertionError(f"decoded {path} during a header-only scan")
    monkeypatch.setattr(scan_module, "load_rgb", no_decoding)
    lazy = scan_folder(tmp_path, DatasetConfig(buckets=SMALL.buckets, verify=False))
    assert len(lazy) == 40
    assert [i.bucket for i in verified.items] == [i.bucket for i in lazy.items]


def test_random_crop_offsets_come_from_the_seed(tmp_path):
    for i in range(6):
        write_image(tmp_path / f"{i}.png", size=(64, 200))

    def crops(seed):
        config = DatasetConfig(buckets=BucketConfig(resolution=64, step=16, min_side=64, max_side=64,
                                                    random_crop=True), seed=seed)
        return [item.crop for item in scan_folder(tmp_path, config).items]
    assert crops(1) == crops(1)
    assert crops(1) != crops(2)
    assert len(set(crops(1))) > 1


def test_nested_and_zero_repeat_folders_warn(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "0_off" / "b.png")
    write_image(tmp_path / "3_on" / "deeper" / "c.png")
    with pytest.warns(DatasetWarning) as caught:
        dataset = scan_folder(tmp_path, SMALL)
    messages = " ".join(str(w.message) for w in caught)
    assert "0_off" in messages and "deeper" in messages
    assert [item.path.name for item in dataset.items] == ["a.png"]


def test_file_changed_after_scan_gives_a_clear_error_on_load(tmp_path):
    path = write_image(tmp_path / "a.png", size=(64, 64))
    (item,) = scan_folder(tmp_path, SMALL).items
    write_image(path, size=(32, 80))
    with pytest.raises(DatasetError, match=r"a\.png.*scan the folder again"):
        item.load()
