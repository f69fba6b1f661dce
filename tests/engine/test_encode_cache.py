"""The encode cache: content keys, safetensors entries with a JSON index, misses on any change."""
import json

import torch

from comfyui_dojo.training.datasets.preview import caption_grid, tensor_to_pil
from comfyui_dojo.training.encode_cache import (EncodeCache, caption_key, file_digest, latent_key,
                                                module_identity)
from comfyui_dojo.training.protocol import Conditioning


def test_keys_change_with_content_geometry_caption_and_encoder(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"one")
    d1 = file_digest(f)
    f.write_bytes(b"two")
    assert file_digest(f) != d1
    geo = {"bucket": (64, 64, 1), "crop": (0, 0, 64, 64)}
    assert latent_key(d1, geo, "vae") == latent_key(d1, dict(geo), "vae")
    assert latent_key(d1, geo, "vae") != latent_key(d1, geo, "vae2")
    assert latent_key(d1, geo, "vae") != latent_key(d1, {**geo, "crop": (1, 0, 64, 64)}, "vae")
    assert caption_key("a cat", "clip") != caption_key("a cat.", "clip")
    assert caption_key("a cat", "clip") != caption_key("a cat", "clip2")


def test_module_identity_sees_weights_shapes_and_settings():
    a = torch.nn.Linear(4, 3)
    same = module_identity(a.state_dict().items())
    assert same == module_identity(list(a.state_dict().items())[::-1])
    with torch.no_grad():
        a.weight[0, 0] += 1
    assert module_identity(a.state_dict().items()) != same
    assert module_identity(a.state_dict().items(), {"layer": -2}) != module_identity(a.state_dict().items())
    assert module_identity(torch.nn.Linear(4, 2).state_dict().items()) != same


def test_entries_round_trip_and_persist_through_the_index(tmp_path):
    cache = EncodeCache(tmp_path)
    latent = torch.randn(4, 8, 8)
    cond = Conditioning(torch.randn(1, 77, 8), torch.randn(1, 8),
                        {"attention_mask": torch.ones(1, 77, dtype=torch.long), "guidance": 3.5})
    assert cache.get_latent("k1") is None and cache.get_cond("k2") is None
    cache.put_latent("k1", latent, "a.png")
    cache.put_cond("k2", cond, "a cat")
    cache.flush()
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["entries"]["k1"]["kind"] == "latent" and index["entries"]["k2"]["caption"] == "a cat"
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pt"))

    again = EncodeCache(tmp_path)
    assert torch.equal(again.get_latent("k1"), latent)
    back = again.get_cond("k2")
    assert torch.equal(back.context, cond.context) and torch.equal(back.pooled, cond.pooled)
    assert torch.equal(back.extra["attention_mask"], cond.extra["attention_mask"])
    assert back.extra["guidance"] == 3.5
    assert again.get_latent("k2") is None  # the kind must match too
    assert (again.hits, again.misses) == (2, 1)


def test_missing_or_corrupt_files_are_misses(tmp_path):
    cache = EncodeCache(tmp_path)
    cache.put_latent("k", torch.zeros(2))
    cache.flush()
    path = tmp_path / cache.index["k"]["file"]
    path.write_bytes(b"garbage")
    assert EncodeCache(tmp_path).get_latent("k") is None
    path.unlink()
    assert EncodeCache(tmp_path).get_latent("k") is None
    (tmp_path / "index.json").write_text("{not json")
    assert EncodeCache(tmp_path).index == {}


def test_caption_grid_draws_every_item():
    frames = [torch.full((3, 32, 48), v) for v in (-1.0, 0.0, 1.0)]
    sheet = caption_grid([(tensor_to_pil(f), f"caption {i}") for i, f in enumerate(frames)], cell=64, columns=2)
    assert sheet.size[0] == 128 and sheet.size[1] > 2 * 64
    assert tensor_to_pil(frames[2]).getpixel((0, 0)) == (255, 255, 255)
