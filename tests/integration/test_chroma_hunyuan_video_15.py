"""Chroma and HunyuanVideo 1.5 as first-class families (issue 18): detected from ComfyUI's model config, their
own spec (Chroma reuses Flux's pieces, HunyuanVideo 1.5 HunyuanVideo's), training learns, the base stays
bit-identical, gradients equal a float64 out-of-place reference per block, strength 0 is exact and the file
loads in ComfyUI's LoraLoaderModelOnly with no unloaded key. Stand-ins: tiny_generic.py (HunyuanVideo 1.5 as a
file UNETLoader detects; Chroma in process, since its smallest detectable file is Flux-sized, and its
detection checked on the meta device)."""
import logging

import pytest
import torch

import family_checks as checks
import tiny_generic
from test_generic_family import dojo, encoded, learns_keeping_the_base  # noqa: F401  (dojo is a fixture)
from test_lora_diffusers_roundtrip import from_comfy_key_map, pack_2x2, run_roundtrip, unpack_2x2

pytestmark = pytest.mark.integration

KINDS = ("chroma", "hunyuan_video_15")


@pytest.fixture(scope="module")
def hv15_file(comfy):
    return tiny_generic.provide_tiny_hunyuan_video_15(comfy.base)


def load(comfy, hv15_file, kind):
    if kind == "chroma":
        return tiny_generic.build_tiny_chroma()
    return tiny_generic.load_unet(comfy.base, hv15_file)


def test_detected_as_their_families(comfy, dojo, hv15_file):
    F = dojo.protocol.Family
    assert tiny_generic.detectable_chroma_config_name() == "Chroma"
    chroma = dojo.comfy_compat.model_spec(load(comfy, hv15_file, "chroma"))
    hv15_patcher = load(comfy, hv15_file, "hunyuan_video_15")
    assert type(hv15_patcher.model.model_config).__name__ == "HunyuanVideo15"
    hv15 = dojo.comfy_compat.model_spec(hv15_patcher)
    assert (chroma.family, hv15.family) == (F.CHROMA, F.HUNYUAN_VIDEO_15)
    assert not chroma.generic and not hv15.generic
    # Reused pieces: Chroma is Flux's blocks and file layout; HunyuanVideo 1.5 is HunyuanVideo's.
    flux, hv = dojo.families.spec(F.FLUX), dojo.families.spec(F.HUNYUAN_VIDEO)
    assert chroma.block_lists == flux.block_lists and chroma.lora_layout == flux.lora_layout
    assert hv15.block_lists == hv.block_lists and hv15.lora_layout == hv.lora_layout
    assert hv15.video and hv15.frames_rule == "4k+1" and hv15.vae_time_scale == 4 and hv15.vae_scale == 16
    assert not chroma.video and chroma.sample_cfg > 1  # Chroma is not guidance-distilled


@pytest.mark.parametrize("kind", KINDS)
def test_lora_learns_keeps_the_base_and_loads_in_comfyui(comfy, dojo, hv15_file, kind, caplog):
    patcher = load(comfy, hv15_file, kind)
    data = encoded(dojo, kind)
    with caplog.at_level(logging.INFO, logger="comfyui-dojo"):
        result = learns_keeping_the_base(dojo, patcher, data)
    assert not any("generic mode" in r.getMessage() for r in caplog.records)
    lora = result.lora
    assert lora.metadata["dojo_family"] == kind
    # Chroma: kohya's Flux names with alpha; HunyuanVideo 1.5: HunyuanVideo's Tencent names, lora_A / lora_B.
    if kind == "chroma":
        assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                   for k in lora)
    else:
        assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora)
        assert any("_attn_qkv." in k for k in lora)
    checks.check_strength_zero(dojo, patcher, data, lora)
    checks.check_loraloader(comfy, dojo, patcher, data, lora, f"tests/{kind}")


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_float64_reference_per_block(comfy, dojo, hv15_file, kind):
    patcher = load(comfy, hv15_file, kind)
    report = checks.check_gradients(dojo, patcher, encoded(dojo, kind, n=2))
    spec = dojo.comfy_compat.model_spec(patcher)
    blocks = {f"{name}.{i}" for name in spec.block_lists for i in range(len(getattr(patcher.model.diffusion_model, name)))}
    assert set(report[True]) == set(report[False]) == blocks


# --- Chroma in diffusers -------------------------------------------------------------------------------
# diffusers' ChromaPipeline loads LoRAs with FluxLoraLoaderMixin, whose kohya converter turns Dojo's
# `lora_unet_<BFL path>` keys into ChromaTransformer2DModel's names. Like Flux's tiny stand-in, the single
# blocks' fused linear1 is left out: diffusers' converter splits it at the real width only
# (test_lora_diffusers_roundtrip covers that split for Flux's, which Chroma shares).

class Chroma:
    name = "chroma"

    @staticmethod
    def comfy_patcher():
        return tiny_generic.build_tiny_chroma(seed=3, **tiny_generic.CHROMA_REAL_DEPTHS)

    @staticmethod
    def diffusers_model(patcher):
        import comfy.utils
        from diffusers import ChromaTransformer2DModel
        c = dict(tiny_generic.CHROMA_TINY, **tiny_generic.CHROMA_REAL_DEPTHS)
        # Not on the meta device: the model computes a buffer (its modulation index table) at init.
        model = ChromaTransformer2DModel(
            patch_size=1, in_channels=c["in_channels"], num_layers=c["depth"],
            num_single_layers=c["depth_single_blocks"], attention_head_dim=c["hidden_size"] // c["num_heads"],
            num_attention_heads=c["num_heads"], joint_attention_dim=c["context_in_dim"],
            axes_dims_rope=tuple(c["axes_dim"]), approximator_num_channels=c["in_dim"],
            approximator_hidden_dim=c["hidden_dim"], approximator_layers=c["n_layers"])
        key_map = comfy.utils.flux_to_diffusers({"depth": c["depth"], "depth_single_blocks": c["depth_single_blocks"],
                                                 "hidden_size": c["hidden_size"]})
        comfy_sd = patcher.model.diffusion_model.state_dict()
        state = from_comfy_key_map(comfy_sd, key_map)
        # Chroma's modulation approximator: the same layers, diffusers' names for its MLPs (and for its RMS
        # norms' weight, which ComfyUI 0.8 calls `scale`).
        for k, v in comfy_sd.items():
            if k.startswith("distilled_guidance_layer."):
                k = k.replace(".in_layer.", ".linear_1.").replace(".out_layer.", ".linear_2.")
                state[k[: -len(".scale")] + ".weight" if k.endswith(".scale") else k] = v
        return model, state

    @staticmethod
    def inputs(batch=2):
        g = torch.Generator().manual_seed(11)
        return dict(x=torch.randn(batch, 16, 8, 8, generator=g), t=torch.tensor([0.3, 0.8][:batch]),
                    context=torch.randn(batch, 7, tiny_generic.CHROMA_TINY["context_in_dim"], generator=g))

    @staticmethod
    def comfy_forward(net, i):
        # Chroma trains and samples at guidance 0 (ComfyUI's Chroma.extra_conds default; diffusers fixes it).
        return net(i["x"], i["t"], i["context"], guidance=torch.zeros(i["x"].shape[0]))

    @staticmethod
    def diffusers_forward(model, i):
        packed, img_ids = pack_2x2(i["x"])
        out = model(hidden_states=packed, timestep=i["t"], encoder_hidden_states=i["context"],
                    txt_ids=torch.zeros(i["context"].shape[1], 3), img_ids=img_ids).sample
        return unpack_2x2(out, i["x"].shape)

    @staticmethod
    def pipeline(model):
        from diffusers import ChromaPipeline
        return ChromaPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=model)


@pytest.mark.parametrize("preset", ["attention", "attention_mlp", "all_linear"])
def test_chroma_lora_matches_in_diffusers(comfy, dojo, tmp_path, preset):
    modules = run_roundtrip(dojo, Chroma, preset, tmp_path, skip=lambda name: name.endswith(".linear1"))
    assert any(n.startswith("double_blocks.") for n in modules) and any(n.startswith("single_blocks.") for n in modules)
