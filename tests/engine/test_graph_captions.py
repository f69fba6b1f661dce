"""Captions from the graph: by order and by name, edits, count mismatches, and writing them back."""
import pytest
from PIL import Image

from comfyui_dojo.training.datasets import DatasetConfig, DatasetError, scan_folder
from comfyui_dojo.training.datasets.captions import CaptionConfig
from comfyui_dojo.training.datasets.graph_captions import (CaptionEdits, captions_by_name, captions_by_order,
                                                         edit_captions, item_names, parse_caption_mapping,
                                                         write_captions)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), (10, 20, 30)).save(root / f"{name}.png")
    (root / "b.txt").write_text("a sidecar caption of b", encoding="utf-8")
    return root


def scan(root, trigger="zkw"):
    return scan_folder(root, DatasetConfig(captions=CaptionConfig(trigger=trigger)))


def finals(dataset):
    rng = dataset.epoch_rng(0)
    return [item.caption(dataset.config.captions, rng) for item in dataset.items]


def test_graph_captions_by_order_replace_sidecars_and_get_the_trigger(folder):
    dataset = captions_by_order(scan(folder), ["red thing", "[trigger] in blue", "green thing"])
    assert item_names(dataset) == ["a.png", "b.png", "c.png"]
    assert finals(dataset) == ["zkw, red thing", "zkw in blue", "zkw, green thing"]


def test_count_mismatch_names_both_counts(folder):
    with pytest.raises(DatasetError, match="got 2 captions for 3 dataset items"):
        captions_by_order(scan(folder), ["one", "two"])


def test_captions_by_name_override_some_and_keep_the_rest(folder):
    dataset = captions_by_name(scan(folder), parse_caption_mapping("a.png: an apple\n\nc.png: a cat"))
    assert [i.caption_raw for i in dataset.items] == ["an apple", "a sidecar caption of b", "a cat"]
    with pytest.raises(DatasetError, match="not in the dataset"):
        captions_by_name(scan(folder), {"zzz.png": "x"})
    with pytest.raises(DatasetError, match="line 1"):
        parse_caption_mapping("no colon here")


def test_edits_apply_to_graph_and_sidecar_captions_alike(folder):
    dataset = captions_by_order(scan(folder), ["a red square", "", "a red circle"])
    dataset.items[1] = dataset.items[1].__class__(**{**dataset.items[1].__dict__, "caption_raw": "a red dot"})
    edited = edit_captions(dataset, CaptionEdits(prefix="photo", suffix="high quality", find="red", replace="blue"))
    assert [i.caption_raw for i in edited.items] == ["photo, a blue square, high quality",
                                                     "photo, a blue dot, high quality",
                                                     "photo, a blue circle, high quality"]
    untouched = edit_captions(scan(folder), CaptionEdits(find="x", replace="y"))
    assert untouched.items[0].caption_raw is None  # still "no caption": trigger alone


def test_write_captions_never_overwrites_unless_asked_and_round_trips(folder):
    dataset = captions_by_order(scan(folder), ["an apple", "a banana", "a cherry"])
    report = write_captions(dataset, overwrite=False)
    assert sorted(p.name for p in report.written) == ["a.txt", "c.txt"]
    assert [p.name for p in report.kept] == ["b.txt"]
    assert (folder / "b.txt").read_text() == "a sidecar caption of b"
    reloaded = scan(folder)
    assert [i.caption_raw for i in reloaded.items] == ["an apple", "a sidecar caption of b", "a cherry"]
    assert finals(reloaded) == finals(captions_by_order(scan(folder), ["an apple", "a sidecar caption of b",
                                                                       "a cherry"]))
    write_captions(dataset, overwrite=True)
    assert (folder / "b.txt").read_text().strip() == "a banana"


def test_write_captions_into_a_copy_leaves_the_source_alone(folder, tmp_path):
    dataset = captions_by_order(scan(folder), ["an apple", "a banana", "a cherry"])
    copy = tmp_path / "out" / "set_copy"
    report = write_captions(dataset, overwrite=False, copy_to=copy)
    assert report.copied and sorted(p.name for p in copy.iterdir()) == ["a.png", "a.txt", "b.png", "b.txt",
                                                                         "c.png", "c.txt"]
    assert not (folder / "a.txt").exists()
    with pytest.raises(FileExistsError):
        write_captions(dataset, overwrite=False, copy_to=copy)
