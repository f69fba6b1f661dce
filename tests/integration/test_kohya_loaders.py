"""Dojo's kohya-style LoRA files load in kohya sd-scripts' own loaders with the weight change ComfyUI applies.

kohya-ss/sd-scripts is not a package: its `networks/` and `library/` folders are taken from a snapshot
of the repository (a bare git mirror, $DOJO_SD_SCRIPTS_GIT, by default the one the `fetch` tool writes)
with `git archive` into a temporary folder and imported from there, unchanged. Its `library/utils.py`
imports OpenCV at module level for image resizing, which no loader path below uses; OpenCV is a large
binary wheel, so the test registers an empty `cv2` module whose every attribute raises: if kohya's loader
ever reached OpenCV, the test would fail.

Full-size models are built on the meta device on both sides (kohya's own UNet / Flux classes, ComfyUI's
BaseModels from its own configs), so file keys are checked against the real architectures. The weight
change compared is kohya's (`LoRAInfModule.get_weight`, what its merge and inference apply) against
ComfyUI's (`comfy.lora.calculate_weight` over the patches `load_lora_for_models` records), on zero base
weights.
"""
from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

SD_SCRIPTS_GIT = Path(os.environ.get("DOJO_SD_SCRIPTS_GIT", "/work/.mirror/kohya-ss+sd-scripts/repo"))
RANK = 4

# The real models' UNet configs, as comfy/model_detection.py lists them (unet_config_from_diffusers_unet).
SD15_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
             'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
             'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': False,
             'context_dim': 768, 'num_heads': 8, 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             'use_temporal_attention': False, 'use_temporal_resblock': False}
SDXL_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
             'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
             'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
             'context_dim': 2048, 'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False}
FLUX_DEV = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                axes_dim=[16, 56, 56], theta=10_000, patch_size=2, qkv_bias=True, guidance_embed=True,
                txt_ids_dims=[])


class _AbsentModule(types.ModuleType):
    def __getattr__(self, name):
        raise AttributeError(f"{self.__name__} is not installed here (kohya's code asked for {self.__name__}.{name})")


@pytest.fixture(scope="module")
def kohya(tmp_path_factory):
    if not SD_SCRIPTS_GIT.exists():
        pytest.skip(f"no kohya-ss/sd-scripts snapshot at {SD_SCRIPTS_GIT}; set DOJO_SD_SCRIPTS_GIT to a bare clone")
    dest = tmp_path_factory.mktemp("sd_scripts")
    tar = subprocess.run(["git", f"--git-dir={SD_SCRIPTS_GIT}", "archive", "HEAD", "networks", "library"],
                         capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(tar)).extractall(dest, filter="data")
    saved = {k: v for k, v in sys.modules.items() if k in ("cv2", "library", "networks")}
    sys.modules.setdefault("cv2", _AbsentModule("cv2"))
    sys.path.insert(0, str(dest))
    try:
        mods = {name: importlib.import_module(name) for name in (
            "networks.lora", "networks.lora_flux", "library.original_unet", "library.sdxl_original_unet",
            "library.flux_models", "library.sai_model_spec")}
        yield types.SimpleNamespace(root=dest, **{k.replace(".", "_"): v for k, v in mods.items()})
    finally:
        sys.path.remove(str(dest))
        for name in [m for m in sys.modules if m.split(".")[0] in ("library", "networks", "cv2")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in (
        "nodes.comfy_model", "nodes.comfy_compat", "training.protocol", "training.lora_formats")}
    return types.SimpleNamespace(**{k.split(".")[-1]: v for k, v in mods.items()})


def meta_patcher(config_name: str, unet_config: dict):
    """ComfyUI's BaseModel for the real architecture, on the meta device (no memory), in a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    config = getattr(comfy.supported_models, config_name)(dict(unet_config, dtype=torch.float32))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("meta"))  # the network on meta, model_sampling real
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def dojo_file(dojo, patcher, preset: str, tmp_path: Path, only=lambda name: True) -> tuple[Path, dict]:
    """What train_lora writes (lora_state_dict) for random factors on the preset's modules, saved as a file."""
    import safetensors.torch
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    modules = {n: m for n, m in view.adaptable_modules(dojo.protocol.TargetPreset(preset)).items() if only(n)}
    g = torch.Generator().manual_seed(5)
    factors = {n: (torch.randn(RANK, m.in_features, generator=g), torch.randn(m.out_features, RANK, generator=g))
               for n, m in modules.items()}
    names = dojo.comfy_compat.sd_unet_diffusers_names(patcher) if view.family.value in ("sd15", "sdxl") else None
    lora = dojo.lora_formats.lora_state_dict(view.family, factors, names)
    assert sum(k.endswith(".alpha") for k in lora) == len(modules)
    path = tmp_path / f"{view.family.value}_{preset}.safetensors"
    safetensors.torch.save_file({k: v.to(torch.float16).contiguous() for k, v in lora.items()}, str(path))
    return path, safetensors.torch.load_file(str(path))


def kohya_and_comfy_agree(dojo, network, kohya_sd: dict, patcher, lora: dict, compare=lambda name: True):
    """Every module kohya built loads its tensors of the file (`kohya_sd`: the file as kohya's loader
    returned it), and its weight change equals the one ComfyUI makes from the file (`lora`) at the same
    strength (kohya's multiplier), for every module `compare` selects (full-size deltas cost time)."""
    multiplier = network.multiplier
    import comfy.lora
    info = network.load_state_dict(kohya_sd, strict=False)
    assert info.unexpected_keys == [] and info.missing_keys == []
    modules = network.text_encoder_loras + network.unet_loras
    assert len(modules) == sum(k.endswith(".lora_down.weight") for k in lora)
    assert all(m.scale == 1.0 for m in modules)  # alpha = rank: the scale is already in up

    with dojo.comfy_compat.capture_lora_warnings() as unloaded:
        applied, _ = dojo.comfy_compat.apply_lora(patcher, None, lora, multiplier, 0.0)
    assert unloaded == [] and len(applied.patches) == len(modules)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    compared = [m for m in modules if compare(m.lora_name)]
    assert compared
    for module in compared:  # one full-size delta at a time (all of Flux's at once would take ~50 GB)
        delta = module.get_weight().float()
        weight_key = key_map[module.lora_name]
        comfy_delta = comfy.lora.calculate_weight(applied.patches[weight_key], torch.zeros(delta.shape), weight_key)
        torch.testing.assert_close(delta, comfy_delta.float(), rtol=1e-5, atol=1e-5)
    return len(modules)


def as_transformers_4(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """kohya names text-encoder modules after transformers 4's CLIPTextModel, whose layers sit under
    `text_model.` (sd-scripts pins transformers 4.x); transformers 5's CLIPTextModel drops that level.
    The same modules under a `text_model` attribute give kohya the names it has with its own pin."""
    if any(name.startswith("text_model.") for name, _ in text_encoder.named_modules()):
        return text_encoder
    holder = torch.nn.Module()
    holder.text_model = text_encoder
    return holder


def test_sd15_file_loads_in_kohya_lora_py(comfy, dojo, kohya, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel
    patcher = meta_patcher("SD15", SD15_UNET)
    path, lora = dojo_file(dojo, patcher, "attention_mlp", tmp_path)
    with torch.device("meta"):
        unet = kohya.library_original_unet.UNet2DConditionModel(
            sample_size=64, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False)
        text_encoder = CLIPTextModel(CLIPTextConfig())
    network, weights = kohya.networks_lora.create_network_from_weights(
        1.0, str(path), None, text_encoder, unet, for_inference=True)
    network.apply_to(text_encoder, unet, apply_text_encoder=False, apply_unet=True)
    assert kohya_and_comfy_agree(dojo, network, weights, patcher, lora) == len(lora) // 3


def test_sdxl_file_loads_in_kohya_lora_py(comfy, dojo, kohya, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    patcher = meta_patcher("SDXL", SDXL_UNET)
    path, lora = dojo_file(dojo, patcher, "attention", tmp_path)
    with torch.device("meta"):
        unet = kohya.library_sdxl_original_unet.SdxlUNet2DConditionModel()
        te1 = CLIPTextModel(CLIPTextConfig())
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                         num_attention_heads=20, num_hidden_layers=32))
    # kohya converts diffusers-named SDXL keys (Dojo's, A1111's) to its SAI names in place
    network, weights = kohya.networks_lora.create_network_from_weights(
        0.8, str(path), None, [te1, te2], unet, for_inference=True)
    assert all(k.startswith("lora_unet_input_blocks_") or k.startswith("lora_unet_middle_block_")
               or k.startswith("lora_unet_output_blocks_") for k in weights)
    network.apply_to([te1, te2], unet, apply_text_encoder=False, apply_unet=True)
    assert kohya_and_comfy_agree(dojo, network, weights, patcher, lora) == len(lora) // 3


@pytest.mark.parametrize("preset", ["attention_mlp", "all_linear"])
def test_flux_file_loads_in_kohya_lora_flux_py(comfy, dojo, kohya, tmp_path, preset):
    import tiny_files
    patcher = meta_patcher("Flux", tiny_files._flux_config(FLUX_DEV))  # the fields this ComfyUI's Flux knows
    path, lora = dojo_file(dojo, patcher, preset, tmp_path)
    flux_models = kohya.library_flux_models
    with torch.device("meta"):
        flux = flux_models.Flux(flux_models.configs["dev"].params)
    network, weights = kohya.networks_lora_flux.create_network_from_weights(
        1.0, str(path), None, [None, None], flux, for_inference=True)
    network.apply_to([None, None], flux, apply_text_encoder=False, apply_unet=True)
    # every module loads; the weight change is compared on the first double and single block (each of
    # Flux's 19 + 38 blocks has the same layout, and a full-size comparison of all takes minutes here)
    first_blocks = lambda name: "_blocks_0_" in name
    assert kohya_and_comfy_agree(dojo, network, weights, patcher, lora, compare=first_blocks) == len(lora) // 3


def test_sdxl_text_encoder_keys_load_in_comfy_and_kohya(comfy, dojo, kohya, smallest_sdxl_checkpoint, tmp_path):
    """SDXL's lora_te1_ (CLIP-L) / lora_te2_ (CLIP-G) keys as the text-encoder LoRA writes them: ComfyUI
    applies them all through strength_clip, kohya's lora.py builds and loads every one of them with the
    same weight change."""
    import safetensors.torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from test_textual_inversion_nodes import load_checkpoint
    te_lora = importlib.import_module(dojo.comfy_model.__name__.replace("comfy_model", "te_lora"))
    model, clip, _ = load_checkpoint(comfy, smallest_sdxl_checkpoint)
    modules = te_lora.te_modules(clip, dojo.protocol.Family.SDXL, te_lora.TeTargets.ATTENTION_MLP)
    g = torch.Generator().manual_seed(9)
    factors = {n: (torch.randn(RANK, m.in_features, generator=g), torch.randn(m.out_features, RANK, generator=g))
               for n, m in modules.items()}
    lora = te_lora.te_lora_keys(dojo.protocol.Family.SDXL, factors)
    assert {k.split("text_model")[0] for k in lora} == {"lora_te1_", "lora_te2_"}
    with dojo.comfy_compat.capture_lora_warnings() as unloaded:
        _, patched = dojo.comfy_compat.apply_lora(model, clip, lora, 0.0, 0.7)
    assert unloaded == [] and len(patched.patcher.patches) == len(modules) == (12 + 32) * 6

    path = tmp_path / "sdxl_te.safetensors"
    safetensors.torch.save_file(lora, str(path))
    with torch.device("meta"):
        unet = kohya.library_sdxl_original_unet.SdxlUNet2DConditionModel()
        te1 = as_transformers_4(CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                             num_attention_heads=12, num_hidden_layers=12)))
        te2 = as_transformers_4(CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32)))
    network, weights = kohya.networks_lora.create_network_from_weights(
        0.7, str(path), None, [te1, te2], unet, for_inference=True)
    network.apply_to([te1, te2], unet, apply_text_encoder=True, apply_unet=False)
    info = network.load_state_dict(weights, strict=False)
    assert info.unexpected_keys == [] and info.missing_keys == []
    assert len(network.text_encoder_loras) == len(modules)
    comfy_lora = importlib.import_module("comfy.lora")  # `comfy` is the harness here
    key_map = comfy_lora.model_lora_keys_clip(clip.cond_stage_model, {})
    for module in network.text_encoder_loras:
        assert module.scale == 1.0
        delta = module.get_weight().float()
        key = key_map[module.lora_name]
        ours = comfy_lora.calculate_weight(patched.patcher.patches[key], torch.zeros(delta.shape), key)
        torch.testing.assert_close(delta, ours.float(), rtol=1e-5, atol=1e-5)
