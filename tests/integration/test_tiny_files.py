"""The tiny model files load through ComfyUI's own loader nodes, are detected as the real families, and
give finite outputs (tiny_files.py, DESIGN.md section 6)."""
import os
import time

import pytest
import torch

pytestmark = pytest.mark.integration


def node(comfy, name):
    return comfy.nodes.NODE_CLASS_MAPPINGS[name]()


def family(patcher) -> str:
    return type(patcher.model.model_config).__name__


def encode_text(comfy, clip, text="a photo"):
    conditioning = node(comfy, "CLIPTextEncode").encode(clip, text)[0]
    cond, extra = conditioning[0]
    return cond, extra.get("pooled_output")


def encode_pixels(comfy, vae, pixels):
    return node(comfy, "VAEEncode").encode(vae, pixels)[0]["samples"]


def image(frames=1, size=64, seed=0):
    return torch.rand(frames, size, size, 3, generator=torch.Generator().manual_seed(seed))


def assert_finite(t):
    assert torch.isfinite(t).all()
    assert t.abs().sum() > 0


@pytest.mark.parametrize("fixture, channels", [("tiny_sd_vae", 4), ("tiny_flux_vae", 16)])
def test_taesd_vaes_encode_images(comfy, request, fixture, channels):
    vae = node(comfy, "VAELoader").load_vae(request.getfixturevalue(fixture))[0]
    assert type(vae.first_stage_model).__name__ == "TAESD"
    latent = encode_pixels(comfy, vae, image())
    assert latent.shape == (1, channels, 8, 8)
    assert_finite(latent)


def test_taehv_vae_encodes_video_for_hunyuan_video(comfy, tiny_video_vae):
    import importlib
    latent_formats = importlib.import_module("comfy.latent_formats")
    vae = node(comfy, "VAELoader").load_vae(tiny_video_vae)[0]
    assert type(vae.first_stage_model).__name__ == "TAEHV"
    # fp16 on disk is what makes ComfyUI take it as HunyuanVideo's TAEHV rather than lighttaew2_1.
    assert vae.first_stage_model.latent_format is latent_formats.HunyuanVideo
    latent = encode_pixels(comfy, vae, image(frames=5))
    assert latent.shape == (1, 16, 2, 8, 8)
    assert_finite(latent)


def test_clip_l_text_encoder(comfy, tiny_clip_l):
    clip = node(comfy, "CLIPLoader").load_clip(tiny_clip_l, "stable_diffusion")[0]
    cond, pooled = encode_text(comfy, clip)
    assert cond.shape == (1, 77, 768)
    assert pooled.shape == (1, 768)
    assert_finite(cond)
    assert_finite(pooled)


def test_sd15_checkpoint(comfy, tiny_sd15_checkpoint):
    model, clip, vae = node(comfy, "CheckpointLoaderSimple").load_checkpoint(tiny_sd15_checkpoint)[:3]
    assert family(model) == "SD15"
    assert model.model.model_config.unet_config["model_channels"] == 320
    cond, _ = encode_text(comfy, clip)
    assert cond.shape == (1, 77, 768)
    assert_finite(cond)
    latent = encode_pixels(comfy, vae, image())
    assert latent.shape == (1, 4, 8, 8)
    assert_finite(latent)
    with torch.inference_mode():
        out = model.model.apply_model(latent, torch.tensor([1.0]), c_crossattn=cond)
    assert out.shape == latent.shape
    assert_finite(out)


def test_sd15_checkpoint_in_a_prompt(comfy, tiny_sd15_checkpoint):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15_checkpoint}},
        "2": {"class_type": "DojoModelInfo", "inputs": {"model": ["1", 0]}},
    }
    result = comfy.run(prompt)
    assert result.success, result.error_message()
    assert "sd15" in result.ui_outputs["2"]["text"][0].lower()


def test_sdxl_checkpoint(comfy, smallest_sdxl_checkpoint):
    model, clip, vae = node(comfy, "CheckpointLoaderSimple").load_checkpoint(smallest_sdxl_checkpoint)[:3]
    assert family(model) == "SDXL"
    cond, pooled = encode_text(comfy, clip)
    assert cond.shape == (1, 77, 2048)  # CLIP-L 768 + CLIP-G 1280
    assert pooled.shape == (1, 1280)
    assert_finite(cond)
    latent = encode_pixels(comfy, vae, image())
    assert latent.shape == (1, 4, 8, 8)
    assert_finite(latent)
    with torch.inference_mode():
        out = model.model.apply_model(latent, torch.tensor([1.0]), c_crossattn=cond,
                                      y=torch.randn(1, 2816, generator=torch.Generator().manual_seed(0)))
    assert out.shape == latent.shape
    assert_finite(out)


def test_tiny_sdxl_builder(comfy, tiny_sdxl):
    assert family(tiny_sdxl) == "SDXL"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.inference_mode():
        out = tiny_sdxl.model.apply_model(x, torch.tensor([1.0]), c_crossattn=torch.randn(1, 77, 2048, generator=g),
                                          y=torch.randn(1, 2816, generator=g))
    assert out.shape == x.shape
    assert_finite(out)


def test_hunyuan_video_unet(comfy, tiny_hunyuan_video_unet):
    model = node(comfy, "UNETLoader").load_unet(tiny_hunyuan_video_unet, "default")[0]
    assert family(model) == "HunyuanVideo"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    with torch.inference_mode():
        out = model.model.apply_model(x, torch.tensor([0.6]), c_crossattn=torch.randn(1, 5, 768, generator=g),
                                      y=torch.randn(1, 768, generator=g), guidance=torch.tensor([1.0]))
    assert out.shape == x.shape
    assert_finite(out)


def flux_forward(patcher):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    with torch.inference_mode():
        out = patcher.model.apply_model(x, torch.tensor([0.6]), c_crossattn=torch.randn(1, 5, 768, generator=g),
                                        y=torch.randn(1, 768, generator=g), guidance=torch.tensor([1.0]))
    assert out.shape == x.shape
    assert_finite(out)


def test_tiny_flux_builder(comfy, tiny_flux):
    assert family(tiny_flux) == "Flux"
    flux_forward(tiny_flux)


def test_detectable_flux_unet(comfy, tiny_flux_unet):
    model = node(comfy, "UNETLoader").load_unet(tiny_flux_unet, "default")[0]
    assert family(model) == "Flux"
    flux_forward(model)


def test_files_come_from_the_versioned_cache(comfy, tiny_sd_vae):
    import tiny_files
    linked = comfy.base / "models" / "vae" / tiny_sd_vae
    cached = tiny_files.cache_dir() / tiny_sd_vae
    assert cached.is_file() and linked.resolve().stat().st_ino == cached.stat().st_ino
    assert tiny_files.cache_dir().parent.name == comfy.version


def test_cache_writes_a_file_once_under_the_version_directories(comfy, tmp_path, monkeypatch):
    import tiny_files
    monkeypatch.setenv("DOJO_TEST_CACHE", str(tmp_path))
    calls = []

    def write(path):
        calls.append(path)
        path.write_bytes(b"weights")

    first = tiny_files.cached_file("model.safetensors", write)
    again = tiny_files.cached_file("model.safetensors", write)
    assert first == again == tmp_path / comfy.version / f"tiny_files+tiny_comfy_models-{tiny_files.builder_key()}" \
        / "model.safetensors"
    assert len(calls) == 1 and first.read_bytes() == b"weights"
    assert [p.name for p in first.parent.iterdir()] == ["model.safetensors"]


def test_a_builders_old_keys_are_removed_and_nothing_else(comfy, tmp_path, monkeypatch):
    """When the builder's key changes, its folders with other keys go once unused for a while; a recently
    used one (another process may be linking from it), other builders' folders and anything the suite did
    not name stay."""
    import tiny_files
    monkeypatch.setenv("DOJO_TEST_CACHE", str(tmp_path))
    version = tmp_path / comfy.version
    name = tiny_files.builder_name()
    old, recent, legacy = version / f"{name}-b{'0' * 16}", version / f"{name}-b{'1' * 16}", version / f"b{'2' * 16}"
    other_builder, foreign = version / f"{name}+tiny_wan-b{'3' * 16}", version / "notes"
    for folder in (old, recent, legacy, other_builder, foreign):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"old weights")
    an_hour_ago = time.time() - 3600
    for folder in (old, legacy, other_builder, foreign):
        os.utime(folder, (an_hour_ago, an_hour_ago))

    current = tiny_files.cached_file("model.safetensors", lambda path: path.write_bytes(b"weights"))
    assert current.read_bytes() == b"weights" and current.parent == tiny_files.cache_dir()
    assert sorted(p.name for p in version.iterdir()) == sorted(
        [current.parent.name, recent.name, other_builder.name, foreign.name])
    assert (recent / "model.safetensors").read_bytes() == b"old weights"


def test_a_files_old_keys_in_its_name_are_removed_and_nothing_else(comfy, tmp_path, monkeypatch):
    """A file keyed in its own name (tiny_qwen's) drops its older keys once unused for a while, when a new
    key is written; a recently used key, other files and other names stay."""
    import tiny_files
    monkeypatch.setenv("DOJO_TEST_CACHE", str(tmp_path))
    folder = tiny_files.cache_dir()
    folder.mkdir(parents=True)
    old, recent = folder / f"qwen_b{'0' * 16}.safetensors", folder / f"qwen_b{'1' * 16}.safetensors"
    other, foreign = folder / f"wan_b{'2' * 16}.safetensors", folder / "qwen.safetensors"
    for path in (old, recent, other, foreign):
        path.write_bytes(b"old weights")
    an_hour_ago = time.time() - 3600
    for path in (old, other, foreign):
        os.utime(path, (an_hour_ago, an_hour_ago))

    current = tiny_files.cached_file(f"qwen_b{'3' * 16}.safetensors", lambda path: path.write_bytes(b"weights"))
    assert current.read_bytes() == b"weights"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        [current.name, recent.name, other.name, foreign.name])


def test_the_cache_key_follows_the_builders_code_and_the_model_seeds(comfy, tmp_path, monkeypatch):
    """Any change to how a file is built (code, a config value, a seed) changes the key, so a warm cache
    never hides what a fresh one gives; comments and docstrings do not."""
    import tiny_files
    source = tiny_files.BUILDER_MODULES[0].read_text()
    assert "def write_sd15_checkpoint(path: Path, seed: int = 5)" in source
    variants = {
        "same": source,
        "comment": source.replace("# ---------------------------------------------------------------------------------------- CLIP",
                                  "# CLIP (a reworded comment)"),
        "docstring": source.replace('"""For CLIPLoader type stable_diffusion:', '"""Reworded. For CLIPLoader:'),
        "seed": source.replace("def write_sd15_checkpoint(path: Path, seed: int = 5)",
                               "def write_sd15_checkpoint(path: Path, seed: int = 6)"),
        "config": source.replace("model_channels=320, num_res_blocks=[1, 1]", "model_channels=320, num_res_blocks=[1, 2]"),
    }
    keys = {}
    for name, text in variants.items():
        assert name == "same" or text != source, name
        path = tmp_path / name / "tiny_files.py"
        path.parent.mkdir()
        path.write_text(text)
        keys[name] = tiny_files.builder_key((path, tiny_files.BUILDER_MODULES[1]))
    assert keys["same"] == keys["comment"] == keys["docstring"] == tiny_files.builder_key()
    assert len({keys["same"], keys["seed"], keys["config"]}) == 3
    monkeypatch.setenv("DOJO_TEST_MODEL_SEED", "1")
    assert tiny_files.builder_key() != keys["same"]
