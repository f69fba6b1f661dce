"""Wan (issue 18): Wan 2.1 T2V / Wan 2.2 A14B experts (ComfyUI's WAN21_T2V) and Wan 2.2 TI2V 5B (WAN22_T2V),
in real ComfyUI, with the tiny loader-detectable stand-ins of tiny_wan.py: detection, learning, the base
left bit-identical, strength 0 exactly the base, LoraLoaderModelOnly with zero "lora key not loaded" lines,
gradients against a float64 out-of-place reference with checkpointing on and off, diffusers' Wan LoRA
loader consuming every tensor with the same output change, 4k+1-frame clips encoded by Wan's VAEs and
trained on, and the noise range each Wan 2.2 A14B expert's LoRA trains on."""
import importlib
import json
import sys

import pytest
import safetensors.torch
import torch

import family_checks as checks
import tiny_wan
from test_dataset_nodes import fresh_folder, image, video
from test_lora_diffusers_roundtrip import assert_close_change, load_in_diffusers

pytestmark = pytest.mark.integration

FAMILIES = {"wan21": (tiny_wan.provide_wan21, "WAN21_T2V", "WAN21", 16),
            "wan22_5b": (tiny_wan.provide_wan22_5b, "WAN22_T2V", "WAN22", 48)}


@pytest.fixture(scope="module")
def dojo(comfy):
    ns = checks.pack(comfy)
    ns.dataset_nodes = importlib.import_module(f"{sys.modules[comfy.pack_module_name()].__name__}.nodes.dataset_nodes")
    return ns


@pytest.fixture(scope="module")
def unet_files(comfy):
    return {family: provide(comfy.base) for family, (provide, *_rest) in FAMILIES.items()}


def load_unet(comfy, unet_files, family):
    return comfy.nodes.UNETLoader().load_unet(unet_files[family], "default")[0]


@pytest.fixture(scope="module")
def umt5(comfy):
    return tiny_wan.tiny_umt5_clip()


def wan_cond(dojo, n, g, tokens=12):
    """umt5-xxl-shaped conditioning (4096 wide; real prompts pad to 512 tokens, shorter keeps tests fast)."""
    return dojo.protocol.Conditioning(torch.randn(n, tokens, 4096, generator=g))


def dataset(dojo, channels, seed=0):
    """Images (T=1) and clips (T=2: 5 frames, T=3: 9 frames) with learnable structure."""
    g = torch.Generator().manual_seed(seed)
    samples, captions = [], []
    for t, count in ((1, 3), (2, 3), (3, 2)):
        for i in range(count):
            y, x = torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8)
            frame = torch.sin(3 * x + i)[None, :] * torch.cos(2 * y - i)[:, None]
            time = torch.cos(torch.arange(t, dtype=torch.float32) + i)[:, None, None]
            latent = (frame[None] * (1 + 0.5 * time))[None] * (1 + torch.arange(channels) / channels).reshape(-1, 1, 1, 1)
            samples.append(dojo.batches.Sample(latent.contiguous(), wan_cond(dojo, 1, g)))
            captions.append(f"{'clip' if t > 1 else 'image'} {i}")
    return dojo.encoded.EncodedDataset(samples, captions)


# --------------------------------------------------------------------------------- the stand-ins

@pytest.mark.parametrize("family", FAMILIES)
def test_stand_ins_are_detected_as_wan(comfy, dojo, unet_files, family):
    _, config, base, channels = FAMILIES[family]
    patcher = load_unet(comfy, unet_files, family)
    assert type(patcher.model.model_config).__name__ == config
    assert type(patcher.model).__name__ == base
    assert patcher.model.latent_format.latent_channels == channels
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    assert view.family.value == family
    assert view.schedule.is_flow and view.schedule.shift == 8.0   # ComfyUI's Wan sampling shift
    assert sum(p.numel() for p in view.diffusion_model.parameters()) < 4_000_000


def test_tiny_umt5_gives_wans_conditioning_shape(umt5):
    cond = umt5.encode_from_tokens(umt5.tokenize("a red square"), return_pooled=True, return_dict=True)
    assert tuple(cond["cond"].shape) == (1, 512, 4096)
    nonzero = (cond["cond"].abs().sum(-1) > 0).sum().item()
    assert 2 <= nonzero < 20   # umt5's Wan setup zeroes the padding after the prompt's tokens


# ---------------------------------------------------------------------- learning and the base

@pytest.mark.parametrize("family", FAMILIES)
def test_lora_learns_leaves_the_base_and_loads_in_comfyui(comfy, dojo, unet_files, family):
    """Issue 18 criterion 1 with family_checks: learning, the base bit-identical, strength 0, the file in
    LoraLoaderModelOnly. Images and clips (1, 2 and 3 latent frames) in one dataset."""
    patcher, data = load_unet(comfy, unet_files, family), dataset(dojo, FAMILIES[family][3])
    # check_learns also checks the base bit-identical around the training (base_unchanged).
    # DOJO_TEST_MODEL_SEED=0..3: the loss fell to 0.49-0.52x (Wan 2.1) and 0.59-0.62x (5B); asked: 0.85x.
    result = checks.check_learns(dojo, patcher, data, checks.lora_job(dojo, steps=40, gradient_checkpointing=True))
    assert all(k.startswith("diffusion_model.blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in result.lora.keys())
    assert checks.lora_modules(result.lora) == 2 * 10   # 2 blocks x (self-/cross-attention q, k, v, o, ffn.0, ffn.2)
    checks.check_strength_zero(dojo, patcher, data, result.lora)
    checks.check_loraloader(comfy, dojo, patcher, data, result.lora, f"tests/wan_checks_{family}")


def test_auto_defaults_for_wan(comfy, dojo, unet_files):
    for family, lr in (("wan21", 2e-4), ("wan22_5b", 1e-4)):
        view = dojo.comfy_model.ComfyDenoisingModel(load_unet(comfy, unet_files, family))
        auto = dojo.train_lora.resolve_auto_settings(view)
        assert (auto.rank, auto.learning_rate) == (32, lr)
        assert auto.targets is dojo.protocol.TargetPreset.ATTENTION_MLP
        assert auto.timestep_sampling is dojo.timesteps.TimestepSampling.SHIFT
        assert auto.shift == 3.0 and view.schedule.shift == 8.0   # musubi-tuner's training shift, not 8
        assert auto.gradient_checkpointing
        # attention + feed-forward of the blocks = every linear of every block (what networks.lora_wan adapts)
        block_linears = {n for n, m in view.diffusion_model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}
        assert set(view.adaptable_modules(auto.targets)) == block_linears
        attention = set(view.adaptable_modules(dojo.protocol.TargetPreset.ATTENTION))
        assert attention == {n for n in block_linears if ".ffn." not in n} and len(attention) == 16


# ---------------------------------------------------------------------------------- gradients

def float64_wan(patcher):
    """family_checks.float64_copy for Wan: ComfyUI's Wan embeds patches from x.float(), which float64
    weights under ComfyUI's default ops refuse; its manual_cast ops cast that one conv's weights to the
    float32 input, and everything after it runs in float64."""
    import comfy.model_patcher
    import comfy.ops
    config = patcher.model.model_config
    previous, config.custom_operations = config.custom_operations, comfy.ops.manual_cast
    try:
        with torch.inference_mode(False):
            model = config.get_model({})
            missing, unexpected = model.load_state_dict(patcher.model.state_dict(), strict=False)
            assert not unexpected and not [k for k in missing if k.startswith("diffusion_model.")]
            model = model.to(torch.float64)
    finally:
        config.custom_operations = previous
    model.diffusion_model.dtype = torch.float64
    model.manual_cast_dtype = None
    return comfy.model_patcher.ModelPatcher(model, load_device=patcher.load_device, offload_device=patcher.offload_device)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_a_float64_out_of_place_reference(comfy, dojo, unet_files, family):
    """family_checks.check_gradients: one step through Dojo's training region, checkpointing off and on,
    against the float64 copy with every saved tensor copied (out of place); per block < 1e-4. Wan's
    blocks write nothing in place, so the spec asks for no copy-on-write protection: this shows it is
    not needed."""
    patcher = load_unet(comfy, unet_files, family)
    data = dataset(dojo, FAMILIES[family][3])
    assert not dojo.comfy_model.ComfyDenoisingModel(patcher).spec.writes_in_place
    report = checks.check_gradients(dojo, patcher, data, reference_patcher=float64_wan(patcher))
    assert set(report) == {False, True} and all(len(errors) == 2 for errors in report.values())


# ----------------------------------------------------------------------------------- diffusers

class WanPipelineOnly:
    """For test_lora_diffusers_roundtrip.load_in_diffusers: diffusers' WanPipeline holding only the network."""

    @staticmethod
    def pipeline(model):
        from diffusers import WanPipeline
        return WanPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None, scheduler=None)


def diffusers_wan(patcher, config):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=config["num_heads"],
        attention_head_dim=config["dim"] // config["num_heads"], in_channels=config["in_dim"],
        out_channels=config["out_dim"], text_dim=4096, freq_dim=256, ffn_dim=config["ffn_dim"],
        num_layers=config["num_layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    state = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    model.load_state_dict(convert_wan_transformer_to_diffusers(state), strict=True)
    return model.eval().float()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["attention", "attention_mlp", "all_linear"])
def test_diffusers_wan_loader_consumes_every_tensor_with_the_same_change(comfy, dojo, unet_files, family, preset,
                                                                         tmp_path):
    """The file Dojo writes loads in diffusers 0.42's WanPipeline.load_lora_weights (its
    _convert_non_diffusers_wan_lora_to_diffusers) into WanTransformer3DModel holding the same weights
    (converted by diffusers' own single-file Wan converter), and changes its output as it changes ComfyUI's."""
    config = tiny_wan.WAN_TINY if family == "wan21" else tiny_wan.WAN22_5B_TINY
    patcher = load_unet(comfy, unet_files, family)
    model = diffusers_wan(patcher, config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, config["in_dim"], 3, 8, 8, generator=g)
    t, context = torch.tensor([300.0, 800.0]), torch.randn(2, 12, 4096, generator=g)

    def comfy_out(p):
        dojo.comfy_compat.load_for_compute(p)
        with torch.inference_mode():
            return p.model.diffusion_model(x, t, context).float()

    def diffusers_out():
        with torch.no_grad():
            return model(hidden_states=x, timestep=t, encoder_hidden_states=context).sample.float()

    base_c, base_d = comfy_out(patcher), diffusers_out()
    torch.testing.assert_close(base_d, base_c, rtol=1e-4, atol=1e-4)   # the same network on both sides

    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    modules = view.adaptable_modules(dojo.protocol.TargetPreset(preset))
    g = torch.Generator().manual_seed(5)
    factors = {n: (torch.randn(4, m.in_features, generator=g) / m.in_features ** 0.5,
                   torch.randn(m.out_features, 4, generator=g) * 0.15) for n, m in modules.items()}
    lora = dojo.lora_training.lora_state_dict(view.family, factors, None)
    with dojo.comfy_compat.capture_lora_warnings() as unloaded:
        applied, _ = dojo.comfy_compat.apply_lora(patcher, None, lora, 1.0, 0.0)
    assert unloaded == [] and len(applied.patches) == len(modules)
    change_c = comfy_out(applied) - base_c
    comfy_out(patcher)

    path = tmp_path / f"{family}_{preset}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in lora.items()}, str(path))
    warnings, loaded, converted = load_in_diffusers(WanPipelineOnly, model, path)
    assert warnings == []
    assert len(loaded) == len(converted) == len(lora)   # every tensor of the file converted and in the model
    assert_close_change(diffusers_out() - base_d, change_c)


# ----------------------------------------------------------------- clips through Wan's VAEs

@pytest.mark.parametrize("family", FAMILIES)
def test_4k_plus_1_frame_clips_encode_with_wans_vae_and_train(comfy, dojo, unet_files, umt5, family):
    channels = FAMILIES[family][3]
    vae_name = tiny_wan.provide_wan21_vae(comfy.base) if family == "wan21" else tiny_wan.provide_taew2_2(comfy.base)
    vae = comfy.nodes.VAELoader().load_vae(vae_name)[0]
    folder = fresh_folder(comfy, f"wan_set_{family}")
    image(folder / "still.png", (64, 64), (120, 40, 40), "a still frame")
    video(folder / "walk.mp4", 9, (64, 64), "a square walking")
    video(folder / "pan.mp4", 10, (64, 64), "a square panning")
    dataset_of = dojo.dataset_nodes.DojoLoadImageDataset.execute
    data = dataset_of(f"wan_set_{family}", resolution=64, bucket_step=64, min_side=64, max_side=128,
                      frames_per_clip=9).args[0]
    assert data.bucket_counts() == {(64, 64, 1): 1, (64, 64, 9): 2}
    if family == "wan22_5b" and not tiny_wan.taew2_2_encodes():
        # ComfyUI 0.8 loads the 48-channel TAEHV for decoding only; its real Wan 2.2 VAE is 705 M parameters.
        with pytest.raises(NotImplementedError, match="encoding"):
            dojo.dataset_nodes.DojoEncodeDataset.execute(data, vae, umt5)
        return
    encoded = dojo.dataset_nodes.DojoEncodeDataset.execute(data, vae, umt5).args[0]
    spatial = 8 if family == "wan21" else 4   # 64 px: Wan 2.1's VAE is 8x, Wan 2.2's 16x
    # 9 frames = 4*2+1 -> 3 latent frames; the still is one
    assert {tuple(s.latent.shape) for s in encoded.samples} == {(channels, 1, spatial, spatial),
                                                               (channels, 3, spatial, spatial)}
    assert all(tuple(s.cond.context.shape) == (1, 512, 4096) for s in encoded.samples)
    patcher = load_unet(comfy, unet_files, family)
    with checks.base_unchanged(dojo, patcher, encoded):
        result = dojo.lora_training.train_lora(patcher, encoded, checks.lora_job(dojo, steps=3, lr=1e-3))
    assert result.steps_done == 3 and all(torch.isfinite(torch.tensor(result.losses)))

    six = dataset_of(f"wan_set_{family}", resolution=64, bucket_step=64, min_side=64, max_side=128,
                     frames_per_clip=6).args[0]
    with pytest.raises(Exception, match=r"4k\+1"):
        dojo.dataset_nodes.DojoEncodeDataset.execute(six, vae, umt5)


# ------------------------------------------------------------------- the A14B experts' ranges

def test_train_node_trains_only_inside_its_timestep_range_and_records_it(comfy, dojo, unet_files, monkeypatch):
    seen = []
    predict = dojo.comfy_model.ComfyDenoisingModel.predict

    def recording_predict(self, noisy, t, cond):
        from torch._subclasses.fake_tensor import FakeTensor
        if not isinstance(t, FakeTensor):   # the memory planner's trial step runs on fake tensors
            seen.append(t.detach().clone())
        return predict(self, noisy, t, cond)

    settings = dict(steps=4, batch_size=2, grad_accumulation=1, learning_rate=1e-3, rank=4, alpha=0.0,
                    adapter="lora", targets="auto", optimizer="adamw", lr_schedule="constant", warmup_steps=0,
                    timestep_sampling="auto", shift=0.0, min_snr_gamma=0.0, noise_offset=0.0,
                    gradient_checkpointing="off", precision="fp32", seed=3, checkpoint_every=0)
    data = dataset(dojo, 16)
    results = {}
    for expert, (lo, hi) in {"high": (0.875, 1.0), "low": (0.0, 0.875)}.items():
        seen.clear()
        monkeypatch.setattr(dojo.comfy_model.ComfyDenoisingModel, "predict", recording_predict)
        out = dojo.train_lora.DojoTrainLoRA.execute(load_unet(comfy, unet_files, "wan21"), data,
                                                    run_name=f"wan_{expert}", timestep_min=lo, timestep_max=hi,
                                                    **settings).result
        monkeypatch.undo()
        t = torch.cat(seen)
        assert len(seen) == 4 and len(t) >= 4 and float(t.min()) >= lo and float(t.max()) <= hi, t
        meta = out[0].metadata
        assert json.loads(meta["dojo_timestep_range"]) == [lo, hi]
        assert (meta["ss_min_timestep"], meta["ss_max_timestep"]) == (str(round(lo * 1000)), str(round(hi * 1000)))
        assert json.loads(meta["dojo_training"])["timestep_range"] == [lo, hi]
        results[expert] = out[0]
    with pytest.raises(ValueError, match="timestep_min"):
        dojo.train_lora.DojoTrainLoRA.execute(load_unet(comfy, unet_files, "wan21"), data, run_name="wan_bad",
                                              timestep_min=0.9, timestep_max=0.5, **settings)
