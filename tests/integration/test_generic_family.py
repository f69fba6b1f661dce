"""Generic mode (issue 18): models ComfyUI loads that no Dojo family module describes train with a spec
built from the model. Stand-ins: an SD3.5-style MMDiT and an LTX-Video transformer, tiny and random, in
files ComfyUI's own UNETLoader detects as SD3 / LTXV (tiny_generic.py)."""
import importlib
import logging
import sys

import pytest
import torch

import tiny_generic

pytestmark = pytest.mark.integration

KINDS = ("sd3", "ltxv")


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    names = ("nodes.comfy_compat", "nodes.comfy_model", "nodes.lora_training", "nodes.lora_nodes",
             "nodes.grad_protection", "training.families", "training.families.generic", "training.protocol",
             "training.batches", "training.encoded", "training.adapters", "training.loop", "training.grad_safety")
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in names}
    return type("Dojo", (), {k.split(".")[-1]: v for k, v in mods.items()})


@pytest.fixture(scope="module")
def unet_files(comfy):
    return {"sd3": tiny_generic.provide_tiny_sd3(comfy.base), "ltxv": tiny_generic.provide_tiny_ltxv(comfy.base)}


def load(comfy, unet_files, kind):
    return tiny_generic.load_unet(comfy.base, unet_files[kind])


def linears(net, under=None):
    return {n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)
            and (under is None or n.split(".")[0] == under)}


# --------------------------------------------------------------------------------- the spec itself

def test_stand_ins_are_detected_and_have_no_family_module(comfy, dojo, unet_files):
    for kind, config in (("sd3", "SD3"), ("ltxv", "LTXV")):
        patcher = load(comfy, unet_files, kind)
        assert type(patcher.model.model_config).__name__ == config
        assert dojo.families.spec_for_config(config) is None


@pytest.mark.parametrize("kind", KINDS)
def test_spec_finds_blocks_and_sorts_their_linears(comfy, dojo, unet_files, kind, caplog):
    patcher = load(comfy, unet_files, kind)
    net = patcher.model.diffusion_model
    with caplog.at_level(logging.INFO, logger="comfyui-dojo"):
        spec = dojo.comfy_compat.generic_spec(patcher)
    P = dojo.protocol.TargetPreset
    assert spec.family is dojo.protocol.Family.GENERIC and spec.generic
    assert spec.lora_layout is dojo.families.COMFY_GENERIC and spec.writes_in_place
    lines = [r.getMessage() for r in caplog.records if "generic mode" in r.getMessage()]
    assert len(lines) == 1 and type(net).__name__ in lines[0] and type(patcher.model).__name__ in lines[0]
    # Built once per network: a clone (which shares it) gets the same spec without another log line.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="comfyui-dojo"):
        assert dojo.comfy_compat.generic_spec(patcher.clone()) is spec
    assert not [r for r in caplog.records if "generic mode" in r.getMessage()]

    def chosen(preset):
        return set(dojo.protocol.select_linears(net, spec.targets[preset]))

    if kind == "sd3":
        assert spec.block_lists == ("joint_blocks",)
        attention = {n for n in linears(net, "joint_blocks") if ".attn." in n or ".attn2." in n}
        mlp = {n for n in linears(net, "joint_blocks") if ".mlp." in n}
        assert "joint_blocks.0.x_block.attn2.qkv" in attention  # SD3.5 Medium's extra self-attention
        assert not spec.video and spec.vae_scale == 8
    else:
        assert spec.block_lists == ("transformer_blocks",)
        attention = {n for n in linears(net, "transformer_blocks") if ".attn1." in n or ".attn2." in n}
        mlp = {n for n in linears(net, "transformer_blocks") if ".ff." in n}
        assert spec.video
    assert attention and mlp
    assert chosen(P.ATTENTION) == attention
    assert chosen(P.ATTENTION_MLP) == attention | mlp
    # All linears: every linear inside the blocks, nothing outside them (SD3's blocks also hold their
    # adaLN modulation linears; LTX-Video's modulate with a table, not a linear).
    assert chosen(P.ALL_LINEAR) == linears(net, spec.block_lists[0]) >= attention | mlp
    assert (chosen(P.ALL_LINEAR) > attention | mlp) == (kind == "sd3")
    assert spec.recipe.targets is P.ATTENTION_MLP and not spec.recipe.gradient_checkpointing


def test_model_without_linears_in_blocks_is_refused_naming_its_class(comfy, dojo):
    """An SD2-style UNet with no transformer blocks: linears exist (time embedding, res blocks) but none
    inside repeated blocks, so generic mode has nothing to put a LoRA on."""
    import comfy.supported_models
    from inprocess_models import patcher_for
    unet_config = {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
        "channel_mult": [1, 2], "transformer_depth": [0, 0], "transformer_depth_output": [0, 0, 0, 0],
        "transformer_depth_middle": -1, "use_spatial_transformer": True, "legacy": False, "context_dim": 1024,
        "num_heads": 4, "num_head_channels": -1, "use_linear_in_transformer": True, "adm_in_channels": None,
        "use_temporal_attention": False, "use_temporal_resblock": False, "dtype": torch.float32,
    }
    patcher = patcher_for(comfy.supported_models.SD20(unet_config), seed=0)
    assert linears(patcher.model.diffusion_model)
    with pytest.raises(dojo.comfy_compat.UnsupportedModelError, match=r"'SD20'.*UNetModel.*no linear layers"):
        dojo.comfy_compat.generic_spec(patcher)
