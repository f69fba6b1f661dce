"""Captions from the graph in real ComfyUI: images out to a captioner, captions back in (by order or
by name) with edits, written as .txt files, and the built-in captioner on a tiny random BLIP."""
import importlib
import sys

import pytest
import torch
from PIL import Image

from test_dataset_nodes import fresh_folder, image

pytestmark = pytest.mark.integration
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "blue", "square", "photo", "of"]


def write_tiny_blip(folder):
    """A random-weight BLIP captioning model + processor built from configs (nonsense text, real code
    path). Its output bias favours the word 'red' so that captions are not empty."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}),
                              BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]"))
    config = BlipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=40, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.decoder.bias
        bias.fill_(-10.0)
        bias[WORDS.index("red")] = 10.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "vocab.txt").unlink()


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    return importlib.import_module(f"{pack}.nodes.caption_nodes")


@pytest.fixture(scope="module")
def tiny_blip(comfy):
    write_tiny_blip(comfy.base / "models" / "captioners" / "tiny_blip")
    return "tiny_blip"


def three_images(comfy, name):
    folder = fresh_folder(comfy, name)
    for i, c in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        image(folder / f"img{i}.png", (64, 64), c)
    (folder / "img1.txt").write_text("a sidecar caption")
    return folder


def load(comfy, name, **kw):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["DojoLoadImageDataset"]
    args = {**comfy.widget_defaults("DojoLoadImageDataset"), "folder": name, "resolution": 64, "min_side": 64,
            "max_side": 64, **kw}
    return node.execute(**args).result[0]


def test_captioner_to_set_captions_to_write_captions_in_a_prompt(comfy, tiny_blip):
    folder = three_images(comfy, "cap_prompt")
    n = comfy.node
    prompt = {
        "data": n("DojoLoadImageDataset", folder="cap_prompt", trigger_word="zkw", resolution=64, min_side=64,
                  max_side=64),
        "caption": n("DojoCaptionImages", dataset=["data", 0], captioner=tiny_blip, max_new_tokens=3, batch_size=2),
        "set": n("DojoSetCaptions", dataset=["data", 0], captions=["caption", 1], prefix="photo"),
        "write": n("DojoWriteCaptions", dataset=["set", 0], overwrite=False),
    }
    result = comfy.run(prompt)
    assert result.success, result.error_message()
    assert "wrote 2 caption files" in result.ui_outputs["write"]["text"][0]
    assert (folder / "img0.txt").read_text().strip() == "photo, red red red"
    assert (folder / "img1.txt").read_text() == "a sidecar caption"  # never overwritten unless asked


def test_set_captions_by_order_by_name_and_mismatch(comfy, dojo):
    three_images(comfy, "cap_direct")
    dataset = load(comfy, "cap_direct", trigger_word="zkw")
    images, names, count = dojo.DojoDatasetImages.execute(dataset).result
    assert count == 3 and names == ["img0.png", "img1.png", "img2.png"]
    assert all(im.shape == (1, 64, 64, 3) and 0 <= im.min() and im.max() <= 1 for im in images)

    by_order = dojo.DojoSetCaptions.execute([dataset], ["order"], ["one", "[trigger] two", "three"],
                                            [""], [""], ["o"], ["0"]).result[0]
    assert [i.caption_raw for i in by_order.items] == ["0ne", "[trigger] tw0", "three"]
    typed = dojo.DojoSetCaptions.execute([dataset], ["order"], ["first\nsecond\nthird"]).result[0]
    assert [i.caption_raw for i in typed.items] == ["first", "second", "third"]
    by_name = dojo.DojoSetCaptions.execute([dataset], ["file name"], ["img2.png: the last one"]).result[0]
    assert [i.caption_raw for i in by_name.items] == [None, "a sidecar caption", "the last one"]
    with pytest.raises(ValueError, match="got 2 captions for 3 dataset items"):
        dojo.DojoSetCaptions.execute([dataset], ["order"], ["one", "two"])


def test_captioner_batches_with_progress_and_one_caption_per_image(comfy, dojo, tiny_blip, monkeypatch):
    three_images(comfy, "cap_batches")
    dataset = load(comfy, "cap_batches")
    updates = []

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            updates.append((value, total))
    monkeypatch.setattr(dojo.cc, "progress_bar", Bar)
    new_dataset, captions = dojo.DojoCaptionImages.execute(dataset, tiny_blip, "", 3, 2).result
    assert captions == ["red red red"] * 3
    assert updates == [(2, 3), (3, 3)]
    assert [i.caption_raw for i in new_dataset.items] == captions


def test_a_missing_captioner_says_what_to_put_where(comfy, dojo):
    three_images(comfy, "cap_missing")
    with pytest.raises(FileNotFoundError, match="models/captioners.*never downloads"):
        dojo.DojoCaptionImages.execute(load(comfy, "cap_missing"), "no_such_model", "", 3, 2)
