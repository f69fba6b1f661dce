"""The metadata other tools read from Dojo's files: kohya's ss_* / sshs_* keys and the ModelSpec keys.

Each saved file is read back and every value checked: against kohya sd-scripts' own code where it
defines the value (its `library/sai_model_spec.build_metadata` for the modelspec keys, its
`train_util.precalculate_safetensors_hashes` for the two hashes, taken from the same snapshot the
kohya loader tests use), and against A1111's reading of the keys (its version detection) by assertion.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import json
import sys
import types
from io import BytesIO
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from test_kohya_loaders import kohya  # noqa: F401  (the kohya-ss/sd-scripts snapshot fixture)
from test_lora_nodes import TRAIN_DEFAULTS
from test_lora_training import FAMILIES, encoded

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    names = ("nodes.train_lora", "nodes.lora_nodes", "nodes.lora_training", "nodes.embedding_nodes",
             "nodes.ti_training", "training.batches", "training.encoded", "training.protocol")
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in names}
    return types.SimpleNamespace(**{k.split(".")[-1]: v for k, v in mods.items()})


def kohya_functions(kohya_root: Path, relative: str, names: tuple[str, ...], namespace: dict) -> dict:
    """Only the named top-level functions of one kohya file, executed from its own source: train_util.py
    imports half of kohya's training stack (accelerate, toml, imagesize, ...) at module level, which the
    hash functions do not use."""
    source = (kohya_root / relative).read_text()
    tree = ast.parse(source)
    picked = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    assert sorted(n.name for n in picked) == sorted(names)
    exec(compile(ast.Module(body=picked, type_ignores=[]), relative, "exec"), namespace)
    return {n: namespace[n] for n in names}


def read(path: str) -> tuple[dict, dict]:
    with safetensors.safe_open(path, "pt") as f:
        return f.metadata(), safetensors.torch.load_file(path)


def saved_lora(comfy, dojo, family: str, prefix: str, captions: list[str], trigger: str = ""):
    data = encoded(dojo, family)
    data = dojo.encoded.EncodedDataset(data.samples, captions, info={"source": "my_set", "trigger_word": trigger})
    build = FAMILIES[family][0]
    # alpha 8 at rank 4: the scale 2 is folded into up, the file's .alpha tensors say 4 (= rank)
    lora = dojo.train_lora.DojoTrainLoRA.execute(build(), data, **dict(TRAIN_DEFAULTS, steps=1, alpha=8.0,
                                                                       run_name=f"meta_{family}")).result[0]
    name = dojo.lora_nodes.DojoSaveLoRA.execute(lora, prefix, "fp16").result[0]
    root = comfy.folder_paths.get_folder_paths("loras")[0]
    return f"{root}/{name}", data


# kohya sd-scripts' build_metadata arguments for each family (train_network.py / flux_train_network.py)
KOHYA_SPEC_ARGS = {"sd15": dict(sdxl=False), "sdxl": dict(sdxl=True),
                   "flux": dict(sdxl=False, model_config={"flux": "dev"})}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_lora_files_carry_kohya_and_modelspec_keys(comfy, dojo, kohya, family):
    captions = ["ohwx dog, grass, sunny", "ohwx dog, beach", "ohwx dog, grass", "ohwx dog"]
    path, data = saved_lora(comfy, dojo, family, f"tests/meta_{family}", captions, trigger="ohwx dog")
    meta, tensors = read(path)
    stem = Path(path).stem
    expected_version = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}[family]
    assert meta["ss_base_model_version"] == expected_version
    assert meta["ss_network_module"] == {"flux": "networks.lora_flux"}.get(family, "networks.lora")
    latent_h, latent_w = FAMILIES[family][1][-2:]
    assert meta["ss_resolution"] == f"({latent_w * 8}, {latent_h * 8})"
    assert json.loads(meta["ss_tag_frequency"]) == {"my_set": {"ohwx dog": 4, "grass": 2, "sunny": 1, "beach": 1}}
    assert meta["ss_output_name"] == stem and meta["modelspec.title"] == stem
    # kohya scales each module by its .alpha / rank; the metadata agrees with the tensors (kohya's
    # train_network.py writes ss_network_dim as an int, ss_network_alpha as a float), the trained alpha
    # is kept in dojo_training
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    assert alphas == {4.0} and ranks == {4}
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["dojo_training"])["alpha"] == 8.0
    assert meta["modelspec.trigger_phrase"] == "ohwx dog"

    # modelspec: what kohya's own build_metadata gives for this family, resolution and time
    spec = kohya.library_sai_model_spec.build_metadata(
        None, v2=False, v_parameterization=False, lora=True, textual_inversion=False,
        timestamp=float(meta["ss_training_started_at"]), reso=(latent_w * 8, latent_h * 8),
        **KOHYA_SPEC_ARGS[family])
    for key in ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                "modelspec.resolution", "modelspec.date"):
        assert meta[key] == spec[key], key
    assert meta.get("modelspec.prediction_type") == spec.get("modelspec.prediction_type")

    # the two hashes, by kohya's own functions over the file's tensors and ss_* metadata
    fns = kohya_functions(kohya.root, "library/train_util.py",
                          ("precalculate_safetensors_hashes", "addnet_hash_legacy", "addnet_hash_safetensors"),
                          {"safetensors": safetensors, "BytesIO": BytesIO, "hashlib": hashlib})
    training_meta = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    model_hash, legacy_hash = fns["precalculate_safetensors_hashes"](tensors, training_meta)
    assert meta["sshs_model_hash"] == model_hash and meta["sshs_legacy_hash"] == legacy_hash
    # A1111 (modules/hashes.py addnet_hash_safetensors) hashes the file's bytes after the header: the same
    raw = open(path, "rb").read()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()

    # A1111 / Forge extensions-builtin/Lora/network.py NetworkOnDisk.detect_version (lines 39-46 of
    # AUTOMATIC1111/stable-diffusion-webui@0a0efa3): ss_base_model_version starting "sdxl_" -> SDXL;
    # else ss_v2 == "True" -> SD2; else any metadata -> SD1. ui_extra_networks_lora.py then hides a LoRA
    # whose version differs from the loaded model's (SDXL model: only SDXL; SD1 model: only SD1; a
    # model that is neither, such as Forge's Flux, hides nothing).
    if family == "sdxl":
        assert str(meta["ss_base_model_version"]).startswith("sdxl_")
    else:
        assert not str(meta["ss_base_model_version"]).startswith("sdxl_") and meta["ss_v2"] != "True"
        assert len(meta)  # -> SD1: shown beside SD1 models, hidden while an SDXL model is loaded


def test_embedding_files_carry_their_base_model_keys(comfy, dojo, kohya):
    vectors = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    embedding = dojo.ti_training.DojoEmbedding("subject", vectors, {})
    prompt_name = dojo.embedding_nodes.DojoSaveEmbedding.execute(embedding, "tests/meta_emb", "fp32").result[0]
    root = comfy.folder_paths.get_folder_paths("embeddings")[0]
    path = f"{root}/{prompt_name.split(':', 1)[1]}.safetensors"
    meta, tensors = read(path)
    stem = Path(path).stem
    assert set(tensors) == {"clip_l", "clip_g"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_output_name"] == stem
    assert meta["modelspec.title"] == stem and meta["modelspec.trigger_phrase"] == stem
    spec = kohya.library_sai_model_spec.build_metadata(
        None, v2=False, v_parameterization=False, sdxl=True, lora=False, textual_inversion=True,
        timestamp=0.0)
    for key in ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                "modelspec.resolution"):
        assert meta[key] == spec[key], key
