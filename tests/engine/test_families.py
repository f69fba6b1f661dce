"""The family registry (training/families): detection by ComfyUI config name, refusals that change
nothing, and the LoRA layouts' key names, without ComfyUI."""
import dataclasses

import pytest
import torch

from comfyui_dojo.training import families
from comfyui_dojo.training.protocol import Family


def test_each_comfy_config_names_one_family_and_unknown_ones_none():
    assert families.spec_for_config("Flux") is families.spec_for_config("FluxSchnell") is families.spec(Family.FLUX)
    assert families.spec_for_config("SD15").family is Family.SD15
    assert families.spec_for_config("SDXL").family is Family.SDXL
    assert families.spec_for_config("HunyuanVideo") is families.spec("hunyuan_video")
    assert families.spec_for_config("SDXLRefiner") is None  # subclasses and relatives are not claimed
    configs = [c for s in families.all_specs() for c in s.comfy_configs]
    assert len(configs) == len(set(configs))
    assert families.as_spec(families.spec("sd15")) is families.spec("sd15")


def test_register_refuses_a_taken_family_or_config_and_changes_nothing(monkeypatch):
    flux = families.spec(Family.FLUX)
    # A registry holding Flux only, so the check does not depend on which other families are registered.
    monkeypatch.setattr(families, "_REGISTRY", {Family.FLUX: flux})
    monkeypatch.setattr(families, "_BY_CONFIG", {"Flux": flux, "FluxSchnell": flux})
    with pytest.raises(ValueError, match="registered twice"):
        families.register(flux)
    clash = dataclasses.replace(flux, family=Family.CHROMA, comfy_configs=("ChromaNew", "Flux"))
    with pytest.raises(ValueError, match="ComfyUI config Flux claimed by flux and chroma"):
        families.register(clash)
    assert families.all_specs() == [flux] and families.spec_for_config("ChromaNew") is None
    assert families.spec_for_config("Flux") is flux
    fresh = dataclasses.replace(flux, family=Family.CHROMA, comfy_configs=("ChromaNew",))
    assert families.register(fresh) is fresh and families.spec_for_config("ChromaNew") is fresh


def test_layouts_name_the_keys_each_loader_reads():
    down, up = torch.ones(2, 3), torch.ones(5, 2)
    flux = families.spec("flux").lora_layout.state_dict({"double_blocks.0.img_attn.qkv": (down, up)})
    assert list(flux) == ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
                          "lora_unet_double_blocks_0_img_attn_qkv.alpha"]
    assert flux["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 2.0
    hunyuan = families.spec("hunyuan_video").lora_layout
    assert list(hunyuan.state_dict({"double_blocks.1.txt_mlp.2": (down, up), "single_blocks.0.modulation.lin":
                                    (down, up)})) == [
        "diffusion_model.double_blocks.1.txt_mlp.fc2.lora_A.weight",
        "diffusion_model.double_blocks.1.txt_mlp.fc2.lora_B.weight",
        "diffusion_model.single_blocks.0.modulation.linear.lora_A.weight",
        "diffusion_model.single_blocks.0.modulation.linear.lora_B.weight"]
    sd = families.spec("sd15").lora_layout
    with pytest.raises(ValueError, match="diffusers name"):
        sd.state_dict({"input_blocks.1.1.proj_in": (down, up)})
    with pytest.raises(ValueError, match="no diffusers name known for 1 modules"):
        sd.state_dict({"input_blocks.1.1.proj_in": (down, up)}, {"other": "x"})
    names = {"input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in"}
    assert sd.keys("input_blocks.1.1.proj_in", names)[0] == \
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
