"""Train LoRA through ComfyUI's MODEL (SD1.5 eps, Flux and HunyuanVideo flow): it learns, the base model
is untouched, the file layout loads through ComfyUI's own LoRA path with no unloaded key, and strength
scales linearly."""
import importlib
import sys

import pytest
import torch

import family_checks
from family_checks import lora_modules
from inprocess_models import tiny_flux_patcher, tiny_hunyuan_video_patcher, tiny_sd15_patcher

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in (
        "nodes.lora_training", "nodes.comfy_model", "nodes.comfy_compat", "training.protocol", "training.batches",
        "training.encoded", "training.adapters", "training.loop")}
    return type("Dojo", (), {k.split(".")[-1]: v for k, v in mods.items()})


# family -> (model builder, latent shape, text width, pooled width or None, key every file key starts with)
def tiny_sdxl_patcher():
    import tiny_files
    return tiny_files.build_tiny_sdxl()


FAMILIES = {
    "sd15": (tiny_sd15_patcher, (4, 16, 16), 768, None, "lora_unet_"),
    "sdxl": (tiny_sdxl_patcher, (4, 16, 16), 2048, 1280, "lora_unet_"),
    "flux": (tiny_flux_patcher, (16, 16, 16), 48, 32, "lora_unet_"),
    "hunyuan_video": (tiny_hunyuan_video_patcher, (16, 3, 8, 8), 48, 32, "diffusion_model."),
}


def cond_for(dojo, family, batch, g):
    _, _, width, pooled, _ = FAMILIES[family]
    extra = {"guidance": 1.0} if family in ("flux", "hunyuan_video") else {}
    return dojo.protocol.Conditioning(torch.randn(batch, 7, width, generator=g),
                                      None if pooled is None else torch.randn(batch, pooled, generator=g), extra)


def encoded(dojo, family="sd15", n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = FAMILIES[family][1]
    samples, captions = [], []
    for i in range(n):
        pattern = torch.linspace(-1, 1, shape[-1])
        latent = (torch.sin(3 * pattern + i)[None, :] * torch.cos(2 * pattern - i)[:, None]).expand(shape).clone()
        latent = latent * (1 + torch.arange(shape[0]).reshape(-1, *[1] * (len(shape) - 1)) / shape[0]) * 2.0
        samples.append(dojo.batches.Sample(latent, cond_for(dojo, family, 1, g)))
        captions.append(f"caption {i}")
    return dojo.encoded.EncodedDataset(samples, captions)


def job(dojo, steps=30, lr=1e-2, **kw):
    return dojo.lora_training.LoraJob(
        adapter=dojo.adapters.AdapterConfig(rank=4, alpha=4),
        targets=dojo.protocol.TargetPreset.ALL_LINEAR,
        train=dojo.loop.TrainConfig(steps=steps, learning_rate=lr, precision=dojo.loop.Precision.FP32, seed=1),
        batch_size=2, **kw)


def reference_output(dojo, patcher, family="sd15"):
    dojo.comfy_compat.load_for_compute(patcher)  # as sampling does: applies this patcher's LoRA patches
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, *FAMILIES[family][1], generator=g)
    cond = cond_for(dojo, family, 2, g)
    with torch.inference_mode():
        return view.predict(x, torch.tensor([0.3, 0.7]), cond)


def fixed_loss(dojo, patcher, data):
    dojo.comfy_compat.load_for_compute(patcher)
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    latents = torch.stack([patcher.model.process_latent_in(s.latent[None])[0] for s in data.samples])
    cond = dojo.batches.collate(data.samples, list(range(len(data)))).cond
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return dojo.loop.diffusion_loss(view, latents, cond, torch.linspace(0.2, 0.8, len(data)), noise).item()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_learns_and_leaves_the_base_model_bit_identical(comfy, dojo, tmp_path, family, checkpointing):
    build, _, _, _, key_start = FAMILIES[family]
    patcher = build()
    data = encoded(dojo, family)
    before_out = reference_output(dojo, patcher, family)
    modules_before = dict(patcher.model.diffusion_model.named_modules())
    flags_before = {n: p.requires_grad for n, p in patcher.model.named_parameters()}
    result = dojo.lora_training.train_lora(patcher, data, job(dojo, checkpoint_dir=tmp_path / "ckpt",
                                                              gradient_checkpointing=checkpointing))
    assert result.steps_done == 30 and not result.cancelled
    assert torch.equal(reference_output(dojo, patcher, family), before_out)
    assert dict(patcher.model.diffusion_model.named_modules()) == modules_before
    assert {n: p.requires_grad for n, p in patcher.model.named_parameters()} == flags_before

    keys = list(result.lora)
    assert keys and all(k.startswith(key_start) for k in keys)
    if family in ("sd15", "sdxl"):
        assert any("down_blocks_" in k and "_attentions_0" in k for k in keys)  # diffusers naming, as A1111/diffusers expect
    before_loss = fixed_loss(dojo, patcher, data)
    with dojo.comfy_compat.capture_lora_warnings() as unloaded:
        trained, _ = dojo.comfy_compat.apply_lora(patcher, None, result.lora, 1.0, 0.0)
    assert unloaded == []
    assert len(trained.patches) == lora_modules(keys)
    after_loss = fixed_loss(dojo, trained, data)
    assert after_loss < 0.85 * before_loss, (before_loss, after_loss, result.losses[:3], result.losses[-3:])
    assert (tmp_path / "ckpt" / "step_000030" / "state.json").is_file()


def test_strength_scales_the_change_linearly(comfy, dojo):
    patcher = tiny_sd15_patcher(seed=1)
    result = dojo.lora_training.train_lora(patcher, encoded(dojo), job(dojo, steps=3, lr=1e-3))
    base = reference_output(dojo, patcher)
    base_weights = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    outputs, weights = {}, {}
    for strength in (0.0, 0.5, 1.0, -1.0):
        applied, _ = dojo.comfy_compat.apply_lora(patcher, None, result.lora, strength, 0.0)
        outputs[strength] = reference_output(dojo, applied)
        weights[strength] = {k: v.clone() for k, v in applied.model.diffusion_model.state_dict().items()}
    reference_output(dojo, patcher)  # reload the base: ComfyUI restores the unpatched weights
    assert all(torch.equal(v, base_weights[k]) for k, v in patcher.model.diffusion_model.state_dict().items())
    assert torch.equal(outputs[0.0], base)
    changed = [k for k in base_weights if not torch.equal(weights[1.0][k], base_weights[k])]
    assert len(changed) == lora_modules(result.lora)
    for k in changed:  # the weights move exactly linearly with strength
        d = weights[1.0][k] - base_weights[k]
        torch.testing.assert_close(weights[0.5][k] - base_weights[k], 0.5 * d, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(weights[-1.0][k] - base_weights[k], -d, rtol=1e-4, atol=1e-7)
    delta = outputs[1.0] - base
    assert delta.abs().max() > 1e-6
    # ...and for a small LoRA the output follows to first order.
    tol = 0.1 * delta.abs().max().item()
    torch.testing.assert_close(outputs[0.5] - base, 0.5 * delta, rtol=0, atol=tol)
    torch.testing.assert_close(outputs[-1.0] - base, -delta, rtol=0, atol=tol)


def test_trains_on_fp8_stored_weights_without_merging_into_them(comfy, dojo, tiny_hunyuan_video_unet):
    """UNETLoader with fp8 weights: the LoRA trains beside the fp8 weights, which stay fp8 and unchanged."""
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["UNETLoader"]()
    with torch.inference_mode():
        patcher = loader.load_unet(tiny_hunyuan_video_unet, "fp8_e4m3fn")[0]
    net = patcher.model.diffusion_model
    fp8 = {n: p.clone() for n, p in net.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert fp8, "the loader did not keep fp8 weights"
    g = torch.Generator().manual_seed(0)
    samples = [dojo.batches.Sample(torch.randn(16, 2, 8, 8, generator=g) * 0.5,
                                   dojo.protocol.Conditioning(torch.randn(1, 7, 768, generator=g),
                                                              torch.randn(1, 768, generator=g), {"guidance": 1.0}))
               for _ in range(2)]
    data = dojo.encoded.EncodedDataset(samples, ["a", "b"])
    result = dojo.lora_training.train_lora(patcher, data, job(dojo, steps=2))
    assert result.steps_done == 2 and all(torch.isfinite(v).all() for v in result.lora.values())
    after = dict(net.named_parameters())
    for name, before in fp8.items():
        assert after[name].dtype == torch.float8_e4m3fn
        assert torch.equal(after[name].view(torch.uint8), before.view(torch.uint8))


def test_flow_families_train_at_guidance_one_unless_the_conditioning_says_otherwise(comfy, dojo):
    view = dojo.comfy_model.ComfyDenoisingModel(tiny_flux_patcher())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 16, 16, generator=g), torch.tensor([0.5])
    context, pooled = torch.randn(1, 7, 48, generator=g), torch.randn(1, 32, generator=g)
    predict = lambda extra: view.predict(x, t, dojo.protocol.Conditioning(context, pooled, extra))  # noqa: E731
    with torch.inference_mode():
        default, one, sampling_default = predict({}), predict({"guidance": 1.0}), predict({"guidance": 3.5})
    assert torch.equal(default, one) and not torch.equal(default, sampling_default)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_gradients_match_the_float64_reference(comfy, family):
    """One step through Dojo's training region, checkpointing off and on, gives the out-of-place float64
    reference's LoRA gradients block by block (HunyuanVideo: test_hunyuan_video_lora.py)."""
    pack = family_checks.pack(comfy)
    family_checks.check_gradients(pack, FAMILIES[family][0](), encoded(pack, family, n=2))


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_gradient_checkpointing_really_recomputes_the_blocks(comfy, dojo, family):
    """Each checkpointed unit a gradient flows through runs twice per step (forward, then again in
    backward) — a wrapper that is never called would train correctly but save no memory. A unit with
    nothing trainable inside whose inputs need no gradient either (SD's first convolution) saves
    nothing for backward and runs once."""
    import importlib
    pack = sys.modules[comfy.pack_module_name()].__name__
    protection = importlib.import_module(f"{pack}.nodes.grad_protection")
    patcher = FAMILIES[family][0]()
    units = protection.checkpoint_units(patcher)
    calls = {id(u): 0 for u in units}
    hooks = [u.register_forward_pre_hook(lambda m, a: calls.__setitem__(id(m), calls[id(m)] + 1)) for u in units]
    try:
        dojo.lora_training.train_lora(patcher, encoded(dojo, family), job(dojo, steps=1, gradient_checkpointing=True))
    finally:
        for h in hooks:
            h.remove()
    ran = [c for c in calls.values() if c]
    assert len(ran) >= len(units) // 2, f"only {len(ran)} of {len(units)} units ran"
    adapted = [u for u in units if any(isinstance(m, torch.nn.Linear) for m in u.modules())]  # all_linear
    assert len(adapted) >= len(units) // 2
    assert all(calls[id(u)] == 2 for u in adapted), sorted(calls[id(u)] for u in adapted)
    assert set(ran) <= {1, 2}, sorted(set(calls.values()))


def test_comfy_training_flag_is_set_only_while_training(comfy, dojo):
    """On 0.33 ComfyUI's own `in_training` flag routes RoPE through differentiable torch ops: Dojo sets it
    for the training region and puts the previous value back, also when training fails; 0.8 has no flag
    and gets none."""
    import comfy.model_management as mm
    had_flag = hasattr(mm, "in_training")
    patcher = tiny_flux_patcher()
    seen = []
    hook = patcher.model.diffusion_model.register_forward_pre_hook(
        lambda m, a: seen.append(getattr(mm, "in_training", None)))
    try:
        dojo.lora_training.train_lora(patcher, encoded(dojo, "flux"), job(dojo, steps=1))
        assert seen and set(seen) == ({True} if had_flag else {None})
        assert getattr(mm, "in_training", None) is (False if had_flag else None)

        def fail(m, a):
            raise RuntimeError("boom")
        failing = patcher.model.diffusion_model.register_forward_pre_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                dojo.lora_training.train_lora(patcher, encoded(dojo, "flux"), job(dojo, steps=1))
        finally:
            failing.remove()
        assert getattr(mm, "in_training", None) is (False if had_flag else None)
    finally:
        hook.remove()
