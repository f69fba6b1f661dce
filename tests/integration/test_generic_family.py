"""Generic mode (issue 18): models ComfyUI loads that no Dojo family module describes train with a spec
built from the model. Stand-ins: an SD3.5-style MMDiT and an LTX-Video transformer, tiny and random, in
files ComfyUI's own UNETLoader detects as SD3 / LTXV (tiny_generic.py)."""
import importlib
import logging
import sys

import pytest
import torch

import family_checks as checks
import tiny_generic

pytestmark = pytest.mark.integration

KINDS = ("sd3", "ltxv")


@pytest.fixture(scope="module")
def dojo(comfy):
    """family_checks' pack modules, and the ones these tests also use."""
    pack = checks.pack(comfy)
    name = sys.modules[comfy.pack_module_name()].__name__
    for module in ("training.families.generic", "training.lora_formats", "nodes.train_lora"):
        setattr(pack, module.split(".")[-1], importlib.import_module(f"{name}.{module}"))
    return pack


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


def job(dojo, steps, lr=1e-2, **kw):
    return dojo.lora_training.LoraJob(
        adapter=dojo.adapters.AdapterConfig(rank=4, alpha=4),
        targets=dojo.protocol.TargetPreset.ATTENTION_MLP,
        train=dojo.loop.TrainConfig(steps=steps, learning_rate=lr, precision=dojo.loop.Precision.FP32, seed=1),
        batch_size=2, **kw)


def learns_keeping_the_base(dojo, patcher, data):
    """family_checks (a) and (b): a 30-step LoRA learns, the base bit-identical around that run (check_learns
    wraps it in base_unchanged) and around a second run after ComfyUI's patching. (b) wraps Dojo's runs only: ComfyUI 0.8's own LoRA loading, which (a) uses, puts the weights it
    patched back as parameters without requires_grad, which is ComfyUI's doing. Returns (a)'s result."""
    result = checks.check_learns(dojo, patcher, data, job(dojo, steps=30, gradient_checkpointing=True))
    with checks.base_unchanged(dojo, patcher, data):  # and after ComfyUI's patching in (a)
        dojo.lora_training.train_lora(patcher, data, job(dojo, steps=2))
    return result


@pytest.mark.parametrize("kind", KINDS)
def test_generic_lora_learns_keeps_the_base_and_loads_in_comfyui(comfy, dojo, unet_files, kind, caplog):
    """Issue 18 criterion 2: learns, base bit-identical, strength 0 exact, LoraLoaderModelOnly loads every key."""
    patcher = load(comfy, unet_files, kind)
    data = encoded(dojo, kind)
    with caplog.at_level(logging.INFO, logger="comfyui-dojo"):
        result = learns_keeping_the_base(dojo, patcher, data)
    assert any("generic mode" in r.getMessage() for r in caplog.records)
    spec = dojo.comfy_compat.model_spec(patcher)
    trained = set(dojo.protocol.select_linears(patcher.model.diffusion_model,
                                               spec.targets[dojo.protocol.TargetPreset.ATTENTION_MLP]))
    lora = result.lora
    # ComfyUI's generic layout, one pair per adapted layer, and the model's config in the metadata.
    assert set(lora) == {f"diffusion_model.{n}.lora_{half}.weight" for n in trained for half in ("down", "up")}
    config = type(patcher.model.model_config).__name__
    assert lora.metadata["dojo_family"] == "generic" and lora.metadata["dojo_comfy_config"] == config
    checks.check_strength_zero(dojo, patcher, data, lora)
    checks.check_loraloader(comfy, dojo, patcher, data, lora, f"tests/generic_{kind}")


@pytest.mark.parametrize("kind", KINDS)
def test_generic_gradients_match_float64_reference_per_block(comfy, dojo, unet_files, kind):
    """One step's gradients through generic mode's protection, checkpointing on and off, equal the
    out-of-place float64 reference per block (family_checks.check_gradients)."""
    patcher = load(comfy, unet_files, kind)
    spec = dojo.comfy_compat.model_spec(patcher)
    report = checks.check_gradients(dojo, patcher, encoded(dojo, kind, n=2))
    blocks = {f"{name}.{i}" for name in spec.block_lists for i in range(len(patcher.model.diffusion_model.get_submodule(name)))}
    assert set(report[True]) == set(report[False]) == blocks


def test_apply_accepts_a_generic_lora_for_its_model_class_only(comfy, dojo, unet_files):
    sd3 = load(comfy, unet_files, "sd3")
    data = encoded(dojo, "sd3")
    lora = dojo.lora_training.train_lora(sd3, data, job(dojo, steps=2)).lora
    applied, _ = dojo.lora_nodes.apply_checked(sd3, None, lora, 1.0, 0.0)
    assert len(applied.patches) == sum(k.endswith(".lora_down.weight") for k in lora)
    # The same file read back through Dojo Load LoRA's reader carries its config in the metadata.
    name = dojo.lora_nodes.DojoSaveLoRA.execute(lora, "tests/generic_sd3_apply", "fp32").result[0]
    from pathlib import Path
    loaded = dojo.lora_nodes.read_lora_file(Path(comfy.folder_paths.get_folder_paths("loras")[0]) / name)
    dojo.lora_nodes.apply_checked(sd3, None, loaded, 1.0, 0.0)
    with pytest.raises(dojo.lora_nodes.LoraDoesNotFit, match=r"SD3.*LTXV|LTXV.*SD3"):
        dojo.lora_nodes.apply_checked(load(comfy, unet_files, "ltxv"), None, loaded, 1.0, 0.0)


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
    train_lora = dojo.train_lora
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
