"""Keys other tools read (file_metadata), alpha keys (lora_formats) and bundled embeddings, without ComfyUI."""
import json

import torch

from comfyui_dojo.training import file_metadata as fm
from comfyui_dojo.training.lora_formats import factors_from_state_dict, lora_state_dict
from comfyui_dojo.training.protocol import Family
from comfyui_dojo.training.textual_inversion import bundle_tensors, split_bundle


def test_tag_frequency_counts_comma_separated_tags_per_caption():
    freq = fm.tag_frequency(["ohwx, a dog, grass", "ohwx,grass", " ohwx "], "set")
    assert freq == {"set": {"ohwx": 3, "a dog": 1, "grass": 2}}


def test_resolution_is_the_largest_latent_in_pixels_width_first():
    assert fm.latent_resolution([(4, 64, 96), (4, 80, 80)]) == (640, 640)
    assert fm.latent_resolution([(16, 5, 60, 104)]) == (832, 480)
    keys = fm.training_keys(Family.SDXL, resolution=(832, 480))
    assert keys["ss_resolution"] == "(832, 480)" and keys["ss_base_model_version"] == "sdxl_base_v1-0"


def test_modelspec_keys_per_family_and_kind():
    flux = fm.modelspec_keys(Family.FLUX, title="t", resolution=None, timestamp=0, prediction="flow")
    assert flux["modelspec.architecture"] == "flux-1-dev/lora" and "modelspec.prediction_type" not in flux
    assert flux["modelspec.resolution"] == "1024x1024"
    sd = fm.modelspec_keys(Family.SD15, kind=fm.KIND_EMBEDDING, title="t", resolution=None, timestamp=0,
                           prediction="eps")
    assert sd["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert sd["modelspec.implementation"] == fm.IMPL_STABILITY_AI and sd["modelspec.prediction_type"] == "epsilon"


def test_hashes_change_with_the_tensors_not_with_non_kohya_metadata():
    t = {"a.lora_down.weight": torch.ones(2, 3)}
    h1 = fm.safetensors_hashes(t, {"ss_x": "1", "dojo_y": "1"})
    h2 = fm.safetensors_hashes(t, {"ss_x": "1", "dojo_y": "2"})
    h3 = fm.safetensors_hashes({"a.lora_down.weight": torch.zeros(2, 3)}, {"ss_x": "1"})
    assert h1 == h2 and h1[0] != h3[0] and len(h1[0]) == 64 and len(h1[1]) == 8


def test_kohya_files_have_alpha_equal_to_rank_and_read_back_with_other_alphas():
    factors = {"double_blocks.0.img_attn.qkv": (torch.randn(4, 8), torch.randn(24, 4))}
    state = lora_state_dict(Family.FLUX, factors)
    assert state["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 4.0
    back = factors_from_state_dict(Family.FLUX, state, list(factors))
    assert torch.equal(back["double_blocks.0.img_attn.qkv"][1], factors["double_blocks.0.img_attn.qkv"][1])
    state["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = torch.tensor(2.0)  # a kohya file with alpha 2
    halved = factors_from_state_dict(Family.FLUX, state, list(factors))["double_blocks.0.img_attn.qkv"][1]
    torch.testing.assert_close(halved, factors["double_blocks.0.img_attn.qkv"][1] / 2)


def test_bundled_embeddings_use_a1111_keys_and_split_back():
    sd = bundle_tensors("tok", {"clip_l": torch.ones(2, 768)})
    assert list(sd) == ["bundle_emb.tok.string_to_param.*"]
    xl = bundle_tensors("tok", {"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)})
    assert sorted(xl) == ["bundle_emb.tok.clip_g", "bundle_emb.tok.clip_l"]
    lora, bundled = split_bundle({**xl, "lora_unet_x.lora_down.weight": torch.ones(1)})
    assert list(lora) == ["lora_unet_x.lora_down.weight"] and sorted(bundled["tok"]) == ["clip_g", "clip_l"]
    _, sd_back = split_bundle(sd)
    assert list(sd_back["tok"]) == ["clip_l"]
    assert json.loads(fm.training_keys(Family.SD15, resolution=None, captions=["a, b"])["ss_tag_frequency"])


def test_network_dim_and_alpha_describe_the_tensors_as_kohya_reads_them():
    g = torch.Generator().manual_seed(0)
    factors = {f"double_blocks.{i}.img_attn.qkv": (torch.randn(4, 8, generator=g), torch.randn(24, 4, generator=g))
               for i in range(2)}
    state = lora_state_dict(Family.FLUX, factors)
    assert fm.network_shape_keys(state) == {"ss_network_dim": "4", "ss_network_alpha": "4.0"}
    # no .alpha (the musubi / diffusers layout) reads as alpha = rank, as every loader applies it
    no_alpha = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    assert fm.network_shape_keys(no_alpha) == {"ss_network_dim": "4", "ss_network_alpha": "4.0"}
    # ranks that differ per module (an SVD export of DoRA / LoHa / LoKr): "Dynamic", as kohya's resize_lora.py
    mixed = lora_state_dict(Family.FLUX, {**factors, "single_blocks.0.linear1": (torch.randn(2, 8), torch.randn(8, 2))})
    assert fm.network_shape_keys(mixed) == {"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"}
    assert fm.network_shape_keys({}) == {}
