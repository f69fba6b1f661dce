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
             "training.batches", "training.encoded", "training.adapters", "training.loop", "training.grad_safety",
             "training.lora_formats")
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


# ------------------------------------------------------------------------------- training a LoRA

def cond_for(dojo, kind, batch, g):
    _, width, pooled = tiny_generic.GENERIC_SHAPES[kind]
    # LTX-Video's T5 encoder hands ComfyUI an integer attention mask with the context, and its network needs it.
    extra = {"attention_mask": torch.ones(batch, 7, dtype=torch.long)} if kind == "ltxv" else {}
    return dojo.protocol.Conditioning(torch.randn(batch, 7, width, generator=g),
                                      None if pooled is None else torch.randn(batch, pooled, generator=g), extra)


def encoded(dojo, kind, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = tiny_generic.GENERIC_SHAPES[kind][0]
    samples, captions = [], []
    for i in range(n):
        pattern = torch.linspace(-1, 1, shape[-1])
        latent = (torch.sin(3 * pattern + i)[None, :] * torch.cos(2 * pattern - i)[:, None]).expand(shape).clone()
        latent = latent * (1 + torch.arange(shape[0]).reshape(-1, *[1] * (len(shape) - 1)) / shape[0]) * 2.0
        samples.append(dojo.batches.Sample(latent, cond_for(dojo, kind, 1, g)))
        captions.append(f"caption {i}")
    return dojo.encoded.EncodedDataset(samples, captions)


def outputs(dojo, patcher, kind):
    """The model's prediction for a fixed input, through ComfyUI's own apply_model (as sampling does)."""
    dojo.comfy_compat.load_for_compute(patcher)
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, *tiny_generic.GENERIC_SHAPES[kind][0], generator=g)
    cond = cond_for(dojo, kind, 2, g)
    with torch.inference_mode():
        return view.predict(x, torch.tensor([0.3, 0.7]), cond)


def fixed_loss(dojo, patcher, data):
    dojo.comfy_compat.load_for_compute(patcher)
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    latents = torch.stack([patcher.model.process_latent_in(s.latent[None])[0] for s in data.samples])
    cond = dojo.batches.collate(data.samples, list(range(len(data.samples)))).cond
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return dojo.loop.diffusion_loss(view, latents, cond, torch.linspace(0.2, 0.8, len(data.samples)), noise).item()


def job(dojo, steps, lr=1e-2, **kw):
    return dojo.lora_training.LoraJob(
        adapter=dojo.adapters.AdapterConfig(rank=4, alpha=4),
        targets=dojo.protocol.TargetPreset.ATTENTION_MLP,
        train=dojo.loop.TrainConfig(steps=steps, learning_rate=lr, precision=dojo.loop.Precision.FP32, seed=1),
        batch_size=2, **kw)


def save_lora(comfy, lora, name):
    import safetensors.torch
    path = comfy.base / "models" / "loras" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in lora.items()}, str(path), metadata=lora.metadata)
    return name


def lora_loader_model_only(dojo, patcher, name, strength):
    """ComfyUI's own LoraLoaderModelOnly node, with its "lora key not loaded" lines collected."""
    import nodes
    with dojo.comfy_compat.capture_lora_warnings() as unloaded:
        (model,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, strength)
    return model, unloaded


@pytest.mark.parametrize("kind", KINDS)
def test_generic_lora_learns_keeps_the_base_and_loads_in_comfyui(comfy, dojo, unet_files, kind, caplog):
    patcher = load(comfy, unet_files, kind)
    data = encoded(dojo, kind)
    base = outputs(dojo, patcher, kind)
    before = fixed_loss(dojo, patcher, data)
    with caplog.at_level(logging.INFO, logger="comfyui-dojo"):
        result = dojo.lora_training.train_lora(patcher, data, job(dojo, steps=30, gradient_checkpointing=True))
    assert result.steps_done == 30 and not result.cancelled
    assert any("generic mode" in r.getMessage() for r in caplog.records)
    # The base model is untouched.
    assert torch.equal(outputs(dojo, patcher, kind), base)

    spec = dojo.comfy_compat.generic_spec(patcher)
    trained = set(dojo.protocol.select_linears(patcher.model.diffusion_model,
                                               spec.targets[dojo.protocol.TargetPreset.ATTENTION_MLP]))
    lora = result.lora
    assert set(lora) == {f"diffusion_model.{n}.lora_{half}.weight" for n in trained for half in ("down", "up")}
    config = type(patcher.model.model_config).__name__
    assert lora.metadata["dojo_family"] == "generic" and lora.metadata["dojo_comfy_config"] == config

    name = save_lora(comfy, lora, f"dojo_generic_{kind}.safetensors")
    adapted, unloaded = lora_loader_model_only(dojo, patcher, name, 1.0)
    assert unloaded == [] and len(adapted.patches) == len(trained)
    after = fixed_loss(dojo, adapted, data)
    assert after < 0.85 * before, (before, after, result.losses[:3], result.losses[-3:])
    assert (outputs(dojo, adapted, kind) - base).abs().max() > 1e-4
    # Strength 0 through ComfyUI's loader is exactly the base model.
    zero, unloaded = lora_loader_model_only(dojo, patcher, name, 0.0)
    assert unloaded == [] and torch.equal(outputs(dojo, zero, kind), base)


def test_apply_accepts_a_generic_lora_for_its_model_class_only(comfy, dojo, unet_files):
    sd3 = load(comfy, unet_files, "sd3")
    data = encoded(dojo, "sd3")
    lora = dojo.lora_training.train_lora(sd3, data, job(dojo, steps=2)).lora
    applied, _ = dojo.lora_nodes.apply_checked(sd3, None, lora, 1.0, 0.0)
    assert len(applied.patches) == sum(k.endswith(".lora_down.weight") for k in lora)
    # The same file read back through Dojo Load LoRA's reader carries its config in the metadata.
    name = save_lora(comfy, lora, "dojo_generic_sd3_apply.safetensors")
    from pathlib import Path
    loaded = dojo.lora_nodes.read_lora_file(Path(comfy.base / "models" / "loras" / name))
    dojo.lora_nodes.apply_checked(sd3, None, loaded, 1.0, 0.0)
    with pytest.raises(dojo.lora_nodes.LoraDoesNotFit, match=r"SD3.*LTXV|LTXV.*SD3"):
        dojo.lora_nodes.apply_checked(load(comfy, unet_files, "ltxv"), None, loaded, 1.0, 0.0)


# ----------------------------------------------------------------------- gradients vs float64

def network_loss(patcher, kind, seed=1):
    """The squared output of the float64 network on fixed inputs, called as ComfyUI's apply_model calls it
    (the conditions from the model's own extra_conds)."""
    g = torch.Generator().manual_seed(seed)
    shape, width, pooled = tiny_generic.GENERIC_SHAPES[kind]
    x = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    extra = {"attention_mask": torch.ones(2, 7, dtype=torch.long)} if kind == "ltxv" else {}
    conds = patcher.model.extra_conds(
        noise=x, device=x.device, cross_attn=torch.randn(2, 7, width, generator=g, dtype=torch.float64),
        pooled_output=None if pooled is None else torch.randn(2, pooled, generator=g, dtype=torch.float64), **extra)
    kwargs = {k: c.process_cond(batch_size=2, area=None).cond for k, c in conds.items()}
    context = kwargs.pop("c_crossattn")
    if "c_concat" in kwargs:  # image-conditioning channels, as BaseModel._apply_model appends them
        x = torch.cat([x, kwargs.pop("c_concat").to(x.dtype)], dim=1)
    out = patcher.model.diffusion_model(x, torch.tensor([0.3, 0.7], dtype=torch.float64), context=context,
                                        transformer_options={}, **kwargs)
    return (out ** 2).mean()


def block_grads(net, spec):
    """The adapter's gradients grouped by block (`<list>.<index>`)."""
    grads = {}
    for name, p in net.named_parameters():
        if p.requires_grad and "lora_" in name:
            block = next(f"{b}.{name[len(b) + 1:].split('.')[0]}" for b in spec.block_lists if name.startswith(b + "."))
            grads.setdefault(block, []).append(p.grad.detach().clone().flatten())
    return {b: torch.cat(g) for b, g in grads.items()}


def float64_adapter(dojo, patcher):
    """Make the stand-in's network float64 and put an all-linear LoRA on it whose halves are both random (so
    every factor gets a gradient). Returns (spec, adapter); detach the adapter when done."""
    net = patcher.model.diffusion_model
    dojo.comfy_compat.materialize_inference_tensors(net)
    net.to(torch.float64)
    spec = dojo.comfy_compat.model_spec(patcher)
    modules = dojo.protocol.select_linears(net, spec.targets[dojo.protocol.TargetPreset.ALL_LINEAR])
    adapter = dojo.adapters.attach_adapter(net, modules, dojo.adapters.AdapterConfig(rank=2, alpha=2), seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapter.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2
    return spec, adapter


@pytest.fixture(scope="module", params=KINDS)
def float64_adapted(request, comfy, dojo, unet_files):
    kind = request.param
    patcher = load(comfy, unet_files, kind)
    spec, adapter = float64_adapter(dojo, patcher)
    yield kind, patcher, spec
    adapter.detach()


def grads_in(dojo, patcher, kind, spec, region):
    net = patcher.model.diffusion_model
    for p in net.parameters():
        p.grad = None
    with torch.inference_mode(False), torch.enable_grad(), dojo.comfy_compat.comfy_training_mode(), region:
        network_loss(patcher, kind).backward()
    return block_grads(net, spec)


@pytest.fixture(scope="module")
def float64_reference(dojo, float64_adapted):
    """Every tensor autograd saves copied when saved: what an out-of-place version of the blocks computes."""
    kind, patcher, spec = float64_adapted
    subs = dojo.comfy_compat.training_substitutions()
    ref = grads_in(dojo, patcher, kind, spec, dojo.grad_safety.clone_all_saved_tensors(subs))
    assert set(ref) == {f"{b}.{i}" for b in spec.block_lists for i in range(len(patcher.model.diffusion_model.get_submodule(b)))}
    assert all(g.abs().max() > 0 for g in ref.values())
    return ref


@pytest.mark.parametrize("checkpointing", [False, True])
def test_generic_gradients_match_float64_reference_per_block(dojo, float64_adapted, float64_reference, checkpointing):
    kind, patcher, spec = float64_adapted
    region = dojo.grad_protection.training_region(patcher, checkpointing, spec=spec)
    got = grads_in(dojo, patcher, kind, spec, region)
    errors = {b: ((got[b] - r).abs().max() / r.abs().max()).item() for b, r in float64_reference.items()}
    assert max(errors.values()) < 1e-4, errors
    blocks = dojo.families.generic.blocks_of(patcher.model.diffusion_model, spec.block_lists)
    assert not any("forward" in vars(b) for b in blocks)
    assert not torch.overrides._get_current_function_mode_stack()


def test_unprotected_backward_shows_which_blocks_write_in_place(dojo, float64_adapted, float64_reference):
    """Without protection: LTX-Video's blocks write in place into tensors autograd saved and backward raises;
    the MMDiT's do not, so plain autograd gives the reference there (which cross-checks the reference
    against ordinary out-of-place backward). Generic mode cannot know which kind a model is, so it protects
    every one (test_generic_gradients_match_float64_reference_per_block)."""
    kind, patcher, spec = float64_adapted
    plain = dojo.grad_safety.op_substitutions(dojo.comfy_compat.training_substitutions())
    if kind == "ltxv":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            grads_in(dojo, patcher, kind, spec, plain)
    else:
        got = grads_in(dojo, patcher, kind, spec, plain)
        assert max(((got[b] - r).abs().max() / r.abs().max()).item() for b, r in float64_reference.items()) < 1e-10


def test_model_that_cannot_run_backward_is_refused_naming_its_class(comfy, dojo, unet_files):
    """A model ComfyUI runs without gradients: an object patch (ComfyUI's mechanism for custom nodes that
    swap a part of the model) puts the SD3's final layer under no_grad, so nothing before it can learn."""
    patcher = load(comfy, unet_files, "sd3")
    final = patcher.model.diffusion_model.final_layer

    class NoGrad(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            with torch.no_grad():
                return self.inner(*args, **kwargs)

    patcher.add_object_patch("diffusion_model.final_layer", NoGrad(final))
    with pytest.raises(dojo.generic.GenericModelError, match=r"'SD3'.*OpenAISignatureMMDITWrapper.*cannot run backward"):
        dojo.lora_training.train_lora(patcher, encoded(dojo, "sd3"), job(dojo, steps=2))


def test_train_lora_node_runs_generic_mode_with_its_defaults(comfy, dojo, unet_files):
    """The node users drop in, with every widget on auto (memory plan included): the generic recipe, the
    model's own flow shift, and a file in ComfyUI's generic layout."""
    import importlib
    pack = sys.modules[comfy.pack_module_name()].__name__
    train_lora = importlib.import_module(f"{pack}.nodes.train_lora")
    patcher = load(comfy, unet_files, "ltxv")
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    auto = train_lora.resolve_auto_settings(view)
    assert (auto.rank, auto.learning_rate, auto.targets) == (16, 1e-4, dojo.protocol.TargetPreset.ATTENTION_MLP)
    assert view.schedule.is_flow and auto.shift == view.schedule.shift > 1  # LTXV samples with a shift
    settings = dict(steps=2, batch_size=2, grad_accumulation=1, learning_rate=0.0, rank=0, alpha=0.0,
                    adapter="lora", targets="auto", optimizer="adamw", lr_schedule="constant", warmup_steps=0,
                    timestep_sampling="auto", shift=0.0, min_snr_gamma=0.0, noise_offset=0.0,
                    gradient_checkpointing="auto", precision="fp32", seed=3, checkpoint_every=0,
                    run_name="generic_ltxv")
    lora, history = train_lora.DojoTrainLoRA.execute(patcher, encoded(dojo, "ltxv"), **settings).result[:2]
    assert len(history["loss"]) == 2
    assert lora.metadata["dojo_family"] == "generic" and lora.metadata["dojo_comfy_config"] == "LTXV"
    assert lora and all(k.startswith("diffusion_model.transformer_blocks.") for k in lora)
    assert all(v.shape[0] == 16 for k, v in lora.items() if k.endswith(".lora_down.weight"))
