import random

import pytest

from comfyui_dojo.training.datasets import (CaptionConfig, DatasetConfig, DatasetError, apply_trigger,
                                            final_caption, read_caption_file, scan_folder, shuffle_tags)
from datasets_media import write_image


def test_caption_file_utf8_with_bom_is_read_without_the_bom(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffcafé, red hat\n".encode("utf-8"))
    assert read_caption_file(path) == "café, red hat"


def test_caption_file_not_utf8_raises_naming_the_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"bad\.txt.*UTF-8"):
        read_caption_file(path)


def test_trigger_is_prepended():
    assert apply_trigger("a red hat", "ohwx") == "ohwx, a red hat"


def test_trigger_placeholder_is_substituted_not_prepended():
    assert apply_trigger("a photo of [trigger] in snow", "ohwx") == "a photo of ohwx in snow"


def test_placeholder_without_trigger_is_removed_with_its_comma():
    assert apply_trigger("[trigger], red hat", "") == "red hat"


def test_missing_caption_means_trigger_alone():
    assert final_caption(None, "ohwx", 0.0, False, 0, random.Random(0)) == "ohwx"
    assert final_caption(None, "", 0.0, False, 0, random.Random(0)) == ""


def test_dropout_gives_trigger_alone_or_empty_at_about_the_rate():
    rng = random.Random(1)
    outs = [final_caption("red hat", "ohwx", 0.3, False, 0, rng) for _ in range(2000)]
    assert set(outs) == {"ohwx", "ohwx, red hat"}
    assert 0.25 < outs.count("ohwx") / len(outs) < 0.35
    assert final_caption("red hat", "", 1.0, False, 0, random.Random(0)) == ""


def test_shuffle_keeps_first_tokens_and_permutes_the_rest():
    caption = "ohwx, a, b, c, d, e, f, g"
    seen = set()
    for seed in range(20):
        out = shuffle_tags(caption, 2, random.Random(seed))
        tags = out.split(", ")
        assert tags[:2] == ["ohwx", "a"] and sorted(tags[2:]) == list("bcdefg")
        seen.add(out)
    assert len(seen) > 5


def test_shuffle_happens_before_trigger_so_trigger_stays_first():
    out = final_caption("x, y, z", "ohwx", 0.0, True, 0, random.Random(3))
    assert out.startswith("ohwx, ")


def test_captions_are_seeded_and_leave_global_rng_alone():
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    a = [final_caption("a, b, c, d, e", "t", 0.5, True, 1, rng) for rng in [random.Random(7)] * 10]
    b = [final_caption("a, b, c, d, e", "t", 0.5, True, 1, rng) for rng in [random.Random(7)] * 10]
    assert a == b and len(set(a)) > 1
    assert random.random() == expected_next


def test_config_rejects_bad_dropout():
    with pytest.raises(DatasetError, match="dropout"):
        CaptionConfig(dropout=1.5)


def test_scan_pairs_sidecar_captions_by_stem(tmp_path):
    write_image(tmp_path / "one.png")
    write_image(tmp_path / "two.jpg")
    (tmp_path / "one.txt").write_text("a red square", encoding="utf-8")
    dataset = scan_folder(tmp_path, DatasetConfig(captions=CaptionConfig(trigger="ohwx")))
    raw = {item.path.name: item.caption_raw for item in dataset.items}
    assert raw == {"one.png": "a red square", "two.jpg": None}
    config = dataset.config.captions
    captions = {item.path.name: item.caption(config, random.Random(0)) for item in dataset.items}
    assert captions == {"one.png": "ohwx, a red square", "two.jpg": "ohwx"}


def test_epoch_rng_depends_on_seed_and_epoch(tmp_path):
    write_image(tmp_path / "one.png")
    dataset = scan_folder(tmp_path, DatasetConfig(seed=5))
    assert dataset.epoch_rng(0).random() == dataset.epoch_rng(0).random()
    assert dataset.epoch_rng(0).random() != dataset.epoch_rng(1).random()


def test_epoch_plan_captions_are_reproducible_and_vary_by_epoch(tmp_path):
    for i in range(6):
        write_image(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a, b, c, d, e")
    config = DatasetConfig(captions=CaptionConfig(trigger="ohwx", dropout=0.3, shuffle=True), seed=11)
    dataset = scan_folder(tmp_path, config)

    def plan(epoch):
        return [[(item.path.name, caption) for item, caption in batch] for batch in dataset.epoch_plan(2, epoch)]
    assert plan(0) == plan(0)
    assert plan(0) != plan(1)
    captions = [caption for batch in plan(0) + plan(1) for _, caption in batch]
    assert all(c == "ohwx" or c.startswith("ohwx, ") for c in captions)
    assert "ohwx" in captions  # some dropped out at 0.3 over 12 samples
