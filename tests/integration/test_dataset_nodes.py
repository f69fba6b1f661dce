"""Dojo Load Image Dataset and Dojo Encode Dataset in real ComfyUI: folder -> dataset -> encoded latents and
conditionings with the graph's own VAE and CLIP (tiny SD1.5 checkpoint; tiny HunyuanVideo VAE + CLIP-L),
the disk cache, and refused folders."""
import importlib
import os
import shutil
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    nodes = importlib.import_module(f"{pack}.nodes.dataset_nodes")
    errors = importlib.import_module(f"{pack}.training.datasets.errors")
    return type("Dojo", (), {"nodes": nodes, "DatasetError": errors.DatasetError})


def image(path: Path, size, color, caption=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    ramp = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]
    pixels = np.clip(np.array(color, np.uint16)[None, None, :] + ramp, 0, 255).astype(np.uint8)
    Image.fromarray(np.broadcast_to(pixels, (h, w, 3)).copy()).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def video(path: Path, frames, size, caption=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 25 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def input_dir(comfy) -> Path:
    return comfy.base / "input"


def fresh_folder(comfy, name) -> Path:
    folder = input_dir(comfy) / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


SD_SETTINGS = dict(resolution=128, bucket_step=64, min_side=64, max_side=256)


def sd_folder(comfy, name="sd_set"):
    folder = fresh_folder(comfy, name)
    image(folder / "a.png", (128, 128), (200, 0, 0), "a red square")
    image(folder / "b.png", (128, 128), (0, 200, 0), "a red square")        # same caption as a.png
    image(folder / "c.jpg", (64, 192), (0, 0, 200), "a wide blue strip")
    image(folder / "2_extra" / "d.png", (192, 64), (90, 90, 0))              # no caption: the trigger
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


def count_calls(obj, name):
    calls = []
    original = getattr(obj, name)

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)
    setattr(obj, name, counting)
    return calls


@pytest.fixture(scope="module")
def sd15(comfy, tiny_sd15_checkpoint):
    _model, clip, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sd15_checkpoint)
    return clip, vae


def load(dojo, folder, **settings):
    return dojo.nodes.DojoLoadImageDataset.execute(folder, **{**SD_SETTINGS, **settings}).args[0]


def test_sd15_folder_to_encoded_dataset_through_a_prompt(comfy, dojo, tiny_sd15_checkpoint):
    sd_folder(comfy)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15_checkpoint}},
        "2": {"class_type": "DojoLoadImageDataset", "inputs": {
            "folder": "sd_set", "trigger_word": "ohwx", "caption_dropout": 0.0, "shuffle_tags": False,
            "keep_tokens": 0, "no_upscale": False, "random_crop": False, "seed": 0, "frames_per_clip": 1,
            "clip_mode": "head", "clips_per_video": 1, "stride": 0, "target_fps": 0.0, **SD_SETTINGS}},
        "3": {"class_type": "DojoEncodeDataset", "inputs": {
            "dataset": ["2", 0], "vae": ["1", 2], "clip": ["1", 1], "cache_to_disk": False}},
    }
    result = comfy.run(prompt)
    assert result.success, result.error_message()
    load_ui = result.ui_outputs["2"]
    assert load_ui["images"] and load_ui["images"][0]["type"] == "temp"
    text = load_ui["text"][0]
    assert "4 items (5 samples per epoch with repeats)" in text
    assert "skipped 1 file(s)" in text and "broken.png" in text
    encode_text = result.ui_outputs["3"]["text"][0]
    assert "5 samples from 4 items; latents: 4 encoded, 0 from cache; captions: 3 distinct, 3 encoded" in encode_text


def test_sd15_latents_buckets_and_captions(comfy, dojo, sd15):
    clip, vae = sd15
    folder = sd_folder(comfy)
    dataset = load(dojo, "sd_set", trigger_word="ohwx")
    assert dataset.root == folder.resolve()
    clip_calls = count_calls(clip, "encode_from_tokens_scheduled")
    vae_calls = count_calls(vae, "encode")
    try:
        encoded = dojo.nodes.DojoEncodeDataset.execute(dataset, vae, clip).args[0]
    finally:
        del clip.encode_from_tokens_scheduled, vae.encode
    assert len(vae_calls) == 4
    assert len(clip_calls) == 3  # "ohwx, a red square" once for a.png and b.png
    assert sorted(encoded.captions) == sorted(["ohwx, a red square"] * 2 + ["ohwx, a wide blue strip"] + ["ohwx"] * 2)
    by_name = {}
    for sample, caption in zip(encoded.samples, encoded.captions):
        by_name.setdefault(caption, []).append(sample)
    # repeats share one latent tensor and their conditioning
    assert by_name["ohwx"][0].latent is by_name["ohwx"][1].latent
    assert by_name["ohwx, a red square"][0].cond is by_name["ohwx, a red square"][1].cond
    buckets = dataset.bucket_counts()
    assert sum(buckets.values()) == 4
    shapes = sorted(tuple(s.latent.shape) for s in encoded.samples)
    expected = sorted((4, h // 8, w // 8) for item in dataset.items for (h, w, t) in [item.bucket]
                      for _ in range(item.repeats))
    assert shapes == expected
    assert {(64, 192, 1), (128, 128, 1)} <= set(buckets)
    cond = encoded.samples[0].cond
    assert cond.context.shape == (1, 77, 768) and not cond.context.is_inference()
    assert not encoded.samples[0].latent.is_inference()
    assert encoded.info["captions_encoded"] == 3 and encoded.info["latents_encoded"] == 4


def test_disk_cache_hits_and_sees_edits(comfy, dojo, sd15):
    clip, vae = sd15
    shutil.rmtree(comfy.base / "output" / "dojo_cache", ignore_errors=True)
    folder = sd_folder(comfy, "cache_set")
    first = dojo.nodes.DojoEncodeDataset.execute(load(dojo, "cache_set"), vae, clip, cache_to_disk=True).args[0]
    assert (first.info["latents_encoded"], first.info["captions_encoded"]) == (4, 3)
    index = comfy.base / "output" / "dojo_cache" / "index.json"
    assert index.is_file()

    clip_calls = count_calls(clip, "encode_from_tokens_scheduled")
    vae_calls = count_calls(vae, "encode")
    try:
        out = dojo.nodes.DojoEncodeDataset.execute(load(dojo, "cache_set"), vae, clip, cache_to_disk=True)
        second = out.args[0]
        assert (len(vae_calls), len(clip_calls)) == (0, 0)
        assert "latents: 0 encoded, 4 from cache" in out.ui["text"][0]
        assert second.fingerprint == first.fingerprint
        assert all(torch.equal(a.cond.context, b.cond.context) for a, b in zip(first.samples, second.samples))

        (folder / "c.txt").write_text("a wide blue strip, edited")
        third = dojo.nodes.DojoEncodeDataset.execute(load(dojo, "cache_set"), vae, clip, cache_to_disk=True).args[0]
        assert (third.info["latents_encoded"], third.info["captions_encoded"]) == (0, 1)
        assert len(clip_calls) == 1  # only the edited caption
        assert "a wide blue strip, edited" in third.captions

        image(folder / "a.png", (128, 128), (10, 10, 250))  # same name and size, new pixels
        fourth = dojo.nodes.DojoEncodeDataset.execute(load(dojo, "cache_set"), vae, clip, cache_to_disk=True).args[0]
        assert (fourth.info["latents_encoded"], fourth.info["latents_cached"]) == (1, 3)
        assert len(vae_calls) == 1
    finally:
        del clip.encode_from_tokens_scheduled, vae.encode


def test_hunyuan_video_images_and_clips(comfy, dojo, tiny_video_vae, tiny_clip_l):
    folder = fresh_folder(comfy, "video_set")
    image(folder / "still.png", (64, 64), (120, 40, 40), "a still frame")
    video(folder / "walk.mp4", 7, (64, 64), "a person walking")
    video(folder / "3_runs" / "run.mp4", 5, (64, 64), "a person walking")  # same caption, 3 repeats
    video(folder / "short.mp4", 3, (64, 64), "too short")
    prompt = {
        "1": {"class_type": "VAELoader", "inputs": {"vae_name": tiny_video_vae}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": tiny_clip_l, "type": "stable_diffusion"}},
        "3": {"class_type": "DojoLoadImageDataset", "inputs": {
            "folder": "video_set", "trigger_word": "", "caption_dropout": 0.0, "shuffle_tags": False,
            "keep_tokens": 0, "resolution": 64, "bucket_step": 64, "min_side": 64, "max_side": 128,
            "no_upscale": False, "random_crop": False, "seed": 0, "frames_per_clip": 5, "clip_mode": "head",
            "clips_per_video": 1, "stride": 0, "target_fps": 0.0}},
        "4": {"class_type": "DojoEncodeDataset", "inputs": {"dataset": ["3", 0], "vae": ["1", 0], "clip": ["2", 0]}},
    }
    result = comfy.run(prompt)
    assert result.success, result.error_message()
    assert "short.mp4: clip too short" in result.ui_outputs["3"]["text"][0]
    assert "latents: 3 encoded" in result.ui_outputs["4"]["text"][0]
    assert "captions: 2 distinct, 2 encoded" in result.ui_outputs["4"]["text"][0]

    vae = comfy.nodes.VAELoader().load_vae(tiny_video_vae)[0]
    clip = comfy.nodes.CLIPLoader().load_clip(tiny_clip_l, type="stable_diffusion")[0]
    dataset = dojo.nodes.DojoLoadImageDataset.execute(
        "video_set", resolution=64, bucket_step=64, min_side=64, max_side=128, frames_per_clip=5).args[0]
    assert dataset.bucket_counts() == {(64, 64, 1): 1, (64, 64, 5): 2}
    encoded = dojo.nodes.DojoEncodeDataset.execute(dataset, vae, clip).args[0]
    shapes = {tuple(s.latent.shape) for s in encoded.samples}
    assert shapes == {(16, 1, 8, 8), (16, 2, 8, 8)}, shapes
    assert len(encoded) == 1 + 1 + 3
    assert encoded.samples[0].cond.context.shape == (1, 77, 768)

    six = dojo.nodes.DojoLoadImageDataset.execute(
        "video_set", resolution=64, bucket_step=64, min_side=64, max_side=128, frames_per_clip=6).args[0]
    with pytest.raises(dojo.DatasetError, match=r"6 frames do not fit this video VAE.*4k\+1 frames.*5 or 9"):
        dojo.nodes.DojoEncodeDataset.execute(six, vae, clip)


def test_folders_outside_the_allowed_roots_are_refused(comfy, dojo, tmp_path):
    outside = tmp_path / "outside"
    image(outside / "x.png", (64, 64), (1, 2, 3), "secret")
    link = input_dir(comfy) / "linked_out"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(outside, target_is_directory=True)
    load_cls = dojo.nodes.DojoLoadImageDataset
    for choice, pattern in [("../models", "absolute paths and '..' are refused"),
                            ("sd_set/../../models", "absolute paths and '..' are refused"),
                            (str(outside), "absolute paths and '..' are refused"),
                            ("linked_out", "resolves to .*outside ComfyUI's input directory")]:
        with pytest.raises(dojo.DatasetError, match=pattern) as info:
            load_cls.execute(choice, **SD_SETTINGS)
        assert "pick it from the list" in str(info.value)
    # the symlink is listed (it is a folder in the input directory) but refused when run
    result = comfy.run({"1": {"class_type": "DojoLoadImageDataset", "inputs": {
        "folder": "linked_out", "trigger_word": "", "caption_dropout": 0.0, "shuffle_tags": False, "keep_tokens": 0,
        "no_upscale": False, "random_crop": False, "seed": 0, "frames_per_clip": 1, "clip_mode": "head",
        "clips_per_video": 1, "stride": 0, "target_fps": 0.0, **SD_SETTINGS}}})
    assert not result.success and "outside ComfyUI's input directory" in result.error_message()
    # a name not in the list never reaches the node: ComfyUI's validation refuses it
    bad = comfy.run({"1": {"class_type": "DojoLoadImageDataset", "inputs": {"folder": "../models"}}})
    assert not bad.success and bad.validation_errors
    link.unlink()


def test_dojo_datasets_root_from_extra_model_paths(comfy, dojo, tmp_path):
    root = tmp_path / "datasets"
    image(root / "cats" / "c.png", (64, 64), (5, 5, 5), "a cat")
    escape = tmp_path / "elsewhere"
    image(escape / "y.png", (64, 64), (5, 5, 5), "no")
    (root / "sneaky").symlink_to(escape, target_is_directory=True)
    comfy.folder_paths.add_model_folder_path("dojo_datasets", str(root))
    try:
        choices = dojo.nodes.dataset_folder_choices()
        assert "dojo_datasets/cats" in choices and "sd_set" in choices
        dataset = load(dojo, "dojo_datasets/cats", resolution=64, min_side=64, max_side=128)
        assert len(dataset) == 1 and dataset.root == (root / "cats").resolve()
        with pytest.raises(dojo.DatasetError, match="outside"):
            load(dojo, "dojo_datasets/sneaky")
        with pytest.raises(dojo.DatasetError, match="refused"):
            load(dojo, "dojo_datasets/../cats")
    finally:
        comfy.folder_paths.folder_names_and_paths["dojo_datasets"][0].remove(str(root))


def test_empty_and_missing_folders_say_what_to_do(comfy, dojo):
    fresh_folder(comfy, "empty_set")
    with pytest.raises(dojo.DatasetError, match=r"empty_set is empty; put images or videos"):
        load(dojo, "empty_set")
    with pytest.raises(dojo.DatasetError, match=r"'no_such_set' does not exist"):
        load(dojo, "no_such_set")
    result = comfy.run({"1": {"class_type": "DojoLoadImageDataset", "inputs": {
        "folder": "empty_set", "trigger_word": "", "caption_dropout": 0.0, "shuffle_tags": False, "keep_tokens": 0,
        "no_upscale": False, "random_crop": False, "seed": 0, "frames_per_clip": 1, "clip_mode": "head",
        "clips_per_video": 1, "stride": 0, "target_fps": 0.0, **SD_SETTINGS}}})
    assert not result.success and "is empty" in result.error_message()
