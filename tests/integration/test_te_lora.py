"""Text-encoder LoRA (issue 19): Train LoRA with a CLIP and text_encoder_lr > 0 also trains a LoRA on the
CLIP's text transformer, with the conditioning computed every step from the captions' tokens. The saved
keys (lora_te_* for SD1.5) are applied by ComfyUI's own LoRA path through strength_clip with no unloaded
key, load in diffusers' load_lora_weights into the text encoder with the same weight change, and the base
CLIP's output is bit-identical afterwards."""
from __future__ import annotations

import dataclasses
import importlib
import sys
import types

import pytest
import safetensors.torch
import torch

from test_textual_inversion_nodes import clip_text_encode, hf_clip_l, latents, same_bits, sd15  # noqa: F401

pytestmark = pytest.mark.integration
CAPTIONS = ["a red cube on a table", "a photo of a red cube", "a red cube in the grass", "a red cube, studio"]


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    names = ("nodes.lora_training", "nodes.te_lora", "nodes.comfy_compat", "nodes.train_lora", "nodes.lora_nodes",
             "training.adapters", "training.batches", "training.encoded", "training.loop", "training.protocol")
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in names}
    return types.SimpleNamespace(**{k.split(".")[-1]: v for k, v in mods.items()})


def dataset(dojo):
    cond = dojo.protocol.Conditioning(torch.zeros(1, 77, 768))  # unused while the text encoder trains
    samples = [dojo.batches.Sample(lat, cond) for lat in latents(n=len(CAPTIONS))]
    return dojo.encoded.EncodedDataset(samples, list(CAPTIONS))


def te_job(dojo, clip, steps=3, te_lr=1e-3):
    return dojo.lora_training.LoraJob(
        adapter=dojo.adapters.AdapterConfig(rank=4, alpha=4), targets=dojo.protocol.TargetPreset.ATTENTION,
        train=dojo.loop.TrainConfig(steps=steps, learning_rate=1e-3, precision=dojo.loop.Precision.FP32, seed=1),
        batch_size=2, text_encoder=dojo.te_lora.TextEncoderJob(clip, te_lr, dojo.te_lora.TeTargets.ATTENTION_MLP))


@pytest.fixture(scope="module")
def trained(comfy, dojo, sd15):
    model, clip, _ = sd15
    before = clip_text_encode(comfy, clip, "a photo of a red cube")
    result = dojo.lora_training.train_lora(model, dataset(dojo), te_job(dojo, clip))
    return result, before


def test_the_text_encoder_trains_and_the_base_clip_is_bit_identical(comfy, dojo, sd15, trained):
    model, clip, _ = sd15
    result, before = trained
    after = clip_text_encode(comfy, clip, "a photo of a red cube")
    assert same_bits(before[0], after[0]) and same_bits(before[1], after[1])
    te_ups = [v for k, v in result.lora.items() if k.startswith("lora_te_") and k.endswith(".lora_up.weight")]
    assert len(te_ups) == 12 * 6  # CLIP-L: 12 layers x (q, k, v, out, fc1, fc2)
    assert all(v.abs().max() > 0 for v in te_ups)  # every text-encoder layer received gradients
    assert result.lora.metadata["ss_text_encoder_lr"] == "0.001"


def test_comfy_applies_the_te_keys_through_strength_clip(comfy, dojo, sd15, trained):
    model, clip, _ = sd15
    result, before = trained
    with dojo.comfy_compat.capture_lora_warnings() as unloaded:
        _, clip_on = dojo.comfy_compat.apply_lora(model, clip, result.lora, 1.0, 1.0)
        _, clip_off = dojo.comfy_compat.apply_lora(model, clip, result.lora, 1.0, 0.0)
    assert unloaded == []
    assert len(clip_on.patcher.patches) == 12 * 6
    on = clip_text_encode(comfy, clip_on, "a photo of a red cube")[0]
    off = clip_text_encode(comfy, clip_off, "a photo of a red cube")[0]
    assert (on - before[0]).abs().max() > 1e-3
    assert same_bits(off, before[0])
    # the node refuses nothing: Dojo Apply LoRA with the CLIP
    lora_nodes = dojo.lora_nodes
    lora_nodes.DojoApplyLoRA.execute(model, result.lora, 1.0, clip, 1.0)
    applied, no_clip = lora_nodes.DojoApplyLoRA.execute(model, result.lora, 1.0).result  # model only: te keys left out
    assert no_clip is None and len(applied.patches) == sum(k.startswith("lora_unet_") and k.endswith(".alpha")
                                                           for k in result.lora)


def test_diffusers_loads_the_te_keys_into_the_text_encoder_with_the_same_change(comfy, dojo, sd15, trained, tmp_path):
    import comfy.lora
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    model, clip, _ = sd15
    result, _ = trained
    te_only = {k: v.contiguous() for k, v in result.lora.items() if k.startswith("lora_te_")}
    path = tmp_path / "te.safetensors"
    safetensors.torch.save_file(te_only, str(path))

    prefix = "clip_l.transformer."
    state = {k[len(prefix):]: v.float() for k, v in clip.cond_stage_model.state_dict().items() if k.startswith(prefix)}
    text_encoder = hf_clip_l(state)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path), adapter_name="dojo")

    _, clip_on = dojo.comfy_compat.apply_lora(model, clip, result.lora, 0.0, 1.0)
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    compared = 0
    for name, module in text_encoder.named_modules():
        if not hasattr(module, "get_delta_weight") or "dojo" not in getattr(module, "lora_A", {}):
            continue
        inner = name if name.startswith("text_model.") else "text_model." + name
        weight_key = key_map["lora_te_" + inner.replace(".", "_")]
        ours = comfy.lora.calculate_weight(clip_on.patcher.patches[weight_key],
                                           torch.zeros(module.base_layer.weight.shape), weight_key)
        torch.testing.assert_close(module.get_delta_weight("dojo").float(), ours.float(), rtol=1e-4, atol=1e-6)
        compared += 1
    assert compared == 12 * 6


def test_continue_from_a_te_lora_loads_both_halves(comfy, dojo, sd15, trained):
    model, clip, _ = sd15
    result, _ = trained
    first = result.lora
    # Zero steps of change: continuing with learning rates ~0 gives back both halves of the LoRA.
    same = dojo.lora_training.train_lora(model, dataset(dojo), dataclasses.replace(
        te_job(dojo, clip, steps=1, te_lr=1e-12), init_lora=first,
        train=dojo.loop.TrainConfig(steps=1, learning_rate=1e-12, precision=dojo.loop.Precision.FP32, seed=1)))
    assert sorted(same.lora) == sorted(first)
    assert all(torch.allclose(same.lora[k], first[k], atol=1e-6) for k in first)
    # a fresh run's text-encoder LoRA starts at up = 0, far from these: they are the continued weights
    assert all(first[k].abs().max() > 1e-4 for k in first if k.startswith("lora_te_") and k.endswith("up.weight"))
    no_te = dataclasses.replace(te_job(dojo, clip, steps=1), init_lora=first, text_encoder=None)
    with pytest.raises(ValueError, match="continue_from holds a text-encoder LoRA .* connect the checkpoint's "
                                         "CLIP .* text_encoder_lr > 0"):
        dojo.lora_training.train_lora(model, dataset(dojo), no_te)
