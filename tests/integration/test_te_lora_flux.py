"""Flux's CLIP-L text-encoder LoRA (issue 19): Train LoRA with a Flux MODEL, its CLIP and
text_encoder_lr > 0 trains a LoRA on the CLIP-L half of ComfyUI's Flux text encoder (FluxClipModel:
CLIP-L + T5). The saved file's `lora_te1_*` keys (kohya's Flux layout) load through ComfyUI's own
LoraLoader node with no unloaded key, change the CLIP's output through strength_clip, and the base CLIP
is bit-identical afterwards.

The stand-in text encoder is ComfyUI's FluxClipModel with its own CLIP-L and a one-layer T5 of width 768
(the real T5-XXL has a fixed 4.7 B-parameter config), so that the conditioning fits the tiny Flux."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import safetensors.torch
import torch

from test_te_lora import CAPTIONS, dojo  # noqa: F401
from test_textual_inversion_nodes import clip_text_encode, same_bits
from tiny_comfy_models import randomize_

pytestmark = pytest.mark.integration
# T5 v1.1's layout (gated GELU, relative attention buckets), one layer; vocabulary as the real tokenizer's.
T5_TINY = {"d_ff": 256, "d_kv": 64, "d_model": 768, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
           "layer_norm_epsilon": 1e-6, "model_type": "t5", "num_heads": 2, "num_layers": 1,
           "relative_attention_num_buckets": 32, "vocab_size": 32128}


@pytest.fixture(scope="module")
def flux_clip(comfy):
    """A comfy.sd.CLIP over ComfyUI's FluxClipModel and FluxTokenizer, with the small T5 above."""
    embeddings = comfy.folder_paths.get_folder_paths("embeddings")
    import comfy.sd
    import comfy.sd1_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5

    class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                     model_options=model_options)
            self.t5xxl = comfy.sd1_clip.SDClipModel(device=device, textmodel_json_config=dict(T5_TINY), dtype=dtype,
                                                    special_tokens={"end": 1, "pad": 0},
                                                    model_class=comfy.text_encoders.t5.T5, model_options=model_options)
            self.dtypes = {dtype}

    target = types.SimpleNamespace(clip=TinyFluxClip, tokenizer=comfy.text_encoders.flux.FluxTokenizer, params={})
    clip = comfy.sd.CLIP(target, embedding_directory=embeddings)
    randomize_(clip.cond_stage_model, 12)
    return clip


def dataset(dojo):
    samples = []
    for i in range(len(CAPTIONS)):
        p = torch.linspace(-1, 1, 16)
        latent = (torch.sin(3 * p + i)[None, :] * torch.cos(2 * p - i)[:, None]).expand(16, 16, 16).clone()
        cond = dojo.protocol.Conditioning(torch.zeros(1, 7, 768), torch.zeros(1, 768), {"guidance": 1.0})
        samples.append(dojo.batches.Sample(latent * 2.0, cond))  # cond unused: the text encoder trains
    return dojo.encoded.EncodedDataset(samples, list(CAPTIONS))


def test_flux_clip_l_lora_loads_in_lora_loader_through_strength_clip_and_leaves_the_clip_unchanged(
        comfy, dojo, tiny_flux, flux_clip):
    model, clip = tiny_flux, flux_clip
    prompt = "a photo of a red cube"
    before = clip_text_encode(comfy, clip, prompt)
    job = dojo.lora_training.LoraJob(
        adapter=dojo.adapters.AdapterConfig(rank=4, alpha=4), targets=dojo.protocol.TargetPreset.ATTENTION,
        train=dojo.loop.TrainConfig(steps=2, learning_rate=1e-3, precision=dojo.loop.Precision.FP32, seed=3),
        batch_size=2, text_encoder=dojo.te_lora.TextEncoderJob(clip, 1e-3, dojo.te_lora.TeTargets.ATTENTION_MLP))
    result = dojo.lora_training.train_lora(model, dataset(dojo), job)

    after = clip_text_encode(comfy, clip, prompt)
    assert same_bits(before[0], after[0]) and same_bits(before[1], after[1])
    te_keys = [k for k in result.lora if k.startswith("lora_te")]
    assert te_keys and all(k.startswith("lora_te1_text_model_encoder_layers_") for k in te_keys)  # CLIP-L only
    te_ups = [result.lora[k] for k in te_keys if k.endswith(".lora_up.weight")]
    assert len(te_ups) == 12 * 6 and all(v.abs().max() > 0 for v in te_ups)

    name = dojo.lora_nodes.DojoSaveLoRA.execute(result.lora, "tests/flux_te", "fp32").result[0]
    saved = safetensors.torch.load_file(str(Path(comfy.folder_paths.get_folder_paths("loras")[0]) / name))
    assert sorted(saved) == sorted(result.lora)
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["LoraLoader"]()
    with dojo.comfy_compat.capture_lora_warnings() as unloaded:
        model_on, clip_on = loader.load_lora(model, clip, name, 1.0, 1.0)
        _, clip_off = loader.load_lora(model, clip, name, 1.0, 0.0)
    assert unloaded == []
    assert len(clip_on.patcher.patches) == 12 * 6
    assert len(model_on.patches) == sum(k.startswith("lora_unet_") and k.endswith(".alpha") for k in saved)
    on = clip_text_encode(comfy, clip_on, prompt)
    off = clip_text_encode(comfy, clip_off, prompt)
    # the CLIP-L LoRA changes the pooled output (CLIP-L's) and, through nothing else, not T5's sequence
    assert (on[1] - before[1]).abs().max() > 1e-4
    assert same_bits(on[0], before[0])
    assert same_bits(off[1], before[1]) and same_bits(off[0], before[0])
    after = clip_text_encode(comfy, clip, prompt)
    assert same_bits(before[1], after[1])
