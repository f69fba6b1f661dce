"""The LoRA nodes: Train (cancel keeps a checkpoint, resume continues exactly), Save (never overwrites,
metadata), Load (safetensors only), Apply (refuses a LoRA that does not fit)."""
import importlib
import sys

import pytest
import safetensors
import torch

from inprocess_models import tiny_flux_patcher, tiny_sd15_patcher
from interrupts import interrupt_in_forward, is_comfy_interrupt
from test_lora_training import encoded, lora_modules

pytestmark = pytest.mark.integration

TRAIN_DEFAULTS = dict(steps=6, batch_size=2, grad_accumulation=1, learning_rate=1e-3, rank=4, alpha=0.0,
                      adapter="lora", targets="auto", optimizer="adamw", lr_schedule="constant", warmup_steps=0,
                      timestep_sampling="auto", shift=0.0, min_snr_gamma=0.0, noise_offset=0.0,
                      gradient_checkpointing="off", precision="fp32", seed=3, checkpoint_every=0,
                      run_name="test_run")


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    names = ("nodes.train_lora", "nodes.lora_nodes", "nodes.lora_training", "nodes.comfy_compat",
             "training.protocol", "training.batches", "training.encoded", "training.checkpoints")
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in names}
    return type("Dojo", (), {k.split(".")[-1]: v for k, v in mods.items()})


def train_node(dojo, model, data, **overrides):
    return dojo.train_lora.DojoTrainLoRA.execute(model, data, **dict(TRAIN_DEFAULTS, **overrides))


def test_train_save_load_apply_round_trip(comfy, dojo):
    model, data = tiny_sd15_patcher(), encoded(dojo)
    out = train_node(dojo, model, data)
    lora, losses, graph = out.result
    assert len(losses["loss"]) == 6 and graph.shape[0] == 1 and graph.shape[-1] == 3
    saved = [dojo.lora_nodes.DojoSaveLoRA.execute(lora, "tests/round_trip", "fp16").result[0] for _ in range(2)]
    assert saved == ["tests/round_trip_00001.safetensors", "tests/round_trip_00002.safetensors"]  # never overwritten
    root = comfy.folder_paths.get_folder_paths("loras")[0]
    with safetensors.safe_open(f"{root}/{saved[0]}", "pt") as f:
        meta = f.metadata()
        assert meta["dojo_family"] == "sd15" and meta["ss_network_dim"] == "4" and meta["dojo_steps"] == "6"
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    loaded, metadata_json = dojo.lora_nodes.DojoLoadLoRA.execute(saved[0]).result
    assert set(loaded) == set(lora) and '"dojo_family": "sd15"' in metadata_json
    applied, clip = dojo.lora_nodes.DojoApplyLoRA.execute(model, loaded, 1.0).result
    assert clip is None and len(applied.patches) == lora_modules(lora)


def test_save_refuses_paths_that_escape_models_loras(comfy, dojo):
    lora = dojo.lora_training.DojoLoRA({"a.lora_down.weight": torch.zeros(1, 1)})
    for prefix in ("../escape", "/tmp/abs", "sub/../../x"):
        with pytest.raises(ValueError, match="filename_prefix"):
            dojo.lora_nodes.DojoSaveLoRA.execute(lora, prefix, "fp16")


def flux_output(dojo, patcher):
    """The tiny Flux's output on fixed inputs, with this patcher's patches (or the base weights)."""
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5])
    context, y = torch.randn(1, 4, 48, generator=g), torch.randn(1, 32, generator=g)
    dojo.comfy_compat.load_for_compute(patcher)
    with torch.inference_mode():
        return patcher.model.diffusion_model(x, t, context, y=y, guidance=torch.tensor([3.5])).clone()


def fitting_flux_lora(patcher) -> dict:
    """A LoRA (ComfyUI's own key names) on one real layer of the tiny Flux, from ComfyUI's key map."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    name = next(k for k, w in key_map.items() if isinstance(w, str) and w.endswith("double_blocks.0.img_attn.qkv.weight"))
    out_features, in_features = patcher.model.diffusion_model.state_dict()[key_map[name].removeprefix("diffusion_model.")].shape
    g = torch.Generator().manual_seed(4)
    return {f"{name}.lora_down.weight": torch.randn(2, in_features, generator=g) * 0.3,
            f"{name}.lora_up.weight": torch.randn(out_features, 2, generator=g) * 0.3}


def test_apply_refuses_a_lora_for_another_family_and_applies_nothing(comfy, dojo):
    sd_lora = train_node(dojo, tiny_sd15_patcher(), encoded(dojo), steps=1).result[0]
    flux = tiny_flux_patcher()
    before = flux_output(dojo, flux)
    apply = dojo.lora_nodes.DojoApplyLoRA.execute
    with pytest.raises(ValueError, match="trained for sd15 but the MODEL is flux"):
        apply(flux, sd_lora, 1.0)
    foreign = dojo.lora_training.DojoLoRA(dict(sd_lora))  # no metadata: caught by the unloaded-key check
    with pytest.raises(ValueError, match="match no layer"):
        apply(flux, foreign, 1.0)
    # Part of a LoRA fitting is not enough: refused as a whole, with nothing applied anywhere.
    fitting = fitting_flux_lora(flux)
    with pytest.raises(ValueError, match="keys match no layer.*Nothing was applied"):
        apply(flux, dojo.lora_training.DojoLoRA({**fitting, **sd_lora}), 1.0)
    assert flux.patches == {} and torch.equal(flux_output(dojo, flux), before)
    # The fitting part alone is applied, to a copy, and changes the output: so the refusals kept it out.
    applied, _ = apply(flux, dojo.lora_training.DojoLoRA(fitting), 1.0).result
    assert applied is not flux and len(applied.patches) == 1 and flux.patches == {}
    assert (flux_output(dojo, applied) - before).abs().max() > 1e-3
    assert torch.equal(flux_output(dojo, flux), before)


def test_load_refuses_truncated_and_pickled_files(comfy, dojo, tmp_path):
    root = comfy.folder_paths.get_folder_paths("loras")[0]
    good = dojo.lora_nodes.DojoSaveLoRA.execute(
        dojo.lora_training.DojoLoRA({"x.lora_down.weight": torch.ones(2, 2)}), "tests/cut", "fp32").result[0]
    data = open(f"{root}/{good}", "rb").read()
    open(f"{root}/tests/truncated.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        dojo.lora_nodes.read_lora_file(__import__("pathlib").Path(f"{root}/tests/truncated.safetensors"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"w": torch.ones(1), "x": Evil()}, f"{root}/tests/evil.ckpt", pickle_protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        dojo.lora_nodes.read_lora_file(__import__("pathlib").Path(f"{root}/tests/evil.ckpt"))
    torch.save({"w.lora_down.weight": torch.ones(1, 1)}, f"{root}/tests/plain.pt")
    assert set(dojo.lora_nodes.read_lora_file(__import__("pathlib").Path(f"{root}/tests/plain.pt"))) == {"w.lora_down.weight"}


def test_cancel_keeps_a_checkpoint_and_resume_continues_exactly(comfy, dojo, caplog):
    data = encoded(dojo)
    straight = train_node(dojo, tiny_sd15_patcher(), data, steps=8, run_name="straight",
                          lr_schedule="cosine", warmup_steps=2).result[0]

    model = tiny_sd15_patcher()
    # ComfyUI's own Cancel, pressed in step 6's forward (batch 2, no accumulation: forward n is step n)
    with interrupt_in_forward(model.model.diffusion_model, call=6), pytest.raises(BaseException) as stopped:
        train_node(dojo, model, data, steps=8, run_name="cancelled", lr_schedule="cosine", warmup_steps=2)
    assert is_comfy_interrupt(stopped.value)
    run = dojo.train_lora.checkpoint_root() / "cancelled_00001"
    assert (run / "step_000005" / "state.json").is_file() and not (run / "step_000006").exists()
    assert "set resume_from to 'cancelled_00001'" in caplog.text and "step 5 of 8" in caplog.text

    resumed = train_node(dojo, tiny_sd15_patcher(), data, steps=8, run_name="ignored", lr_schedule="cosine",
                         warmup_steps=2, resume_from="cancelled_00001").result[0]
    assert set(resumed) == set(straight)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert (run / "step_000008" / "state.json").is_file()

    with pytest.raises(ValueError, match="different run configuration.*learning_rate"):
        train_node(dojo, tiny_sd15_patcher(), data, steps=10, learning_rate=5e-3, resume_from="cancelled_00001")
    with pytest.raises(ValueError, match="resume_from"):
        train_node(dojo, tiny_sd15_patcher(), data, resume_from="../../etc")


def test_same_seed_same_lora_bits(comfy, dojo):
    a = train_node(dojo, tiny_sd15_patcher(), encoded(dojo), run_name="seed_a").result[0]
    b = train_node(dojo, tiny_sd15_patcher(), encoded(dojo), run_name="seed_b").result[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("adapter", ["dora", "loha", "lokr"])
def test_other_adapter_types_save_as_plain_loras_that_load_everywhere(comfy, dojo, adapter):
    model = tiny_sd15_patcher()
    lora = train_node(dojo, model, encoded(dojo), steps=2, adapter=adapter, learning_rate=1e-2,
                      run_name=f"kind_{adapter}").result[0]
    assert lora and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in lora)
    applied, _ = dojo.lora_nodes.DojoApplyLoRA.execute(model, lora, 1.0).result  # raises on any unloaded key
    assert len(applied.patches) == lora_modules(lora)


def test_training_can_continue_from_a_saved_lora_file(comfy, dojo):
    model, data = tiny_sd15_patcher(), encoded(dojo)
    first = train_node(dojo, model, data, steps=4, run_name="cont_a").result[0]
    name = dojo.lora_nodes.DojoSaveLoRA.execute(first, "tests/continue", "fp32").result[0]
    loaded = dojo.lora_nodes.DojoLoadLoRA.execute(name).result[0]
    # Zero steps of change: a run that continues with learning rate ~0 gives back the same LoRA.
    same = train_node(dojo, model, data, steps=1, learning_rate=1e-12, run_name="cont_b", continue_from=loaded).result[0]
    assert all(torch.allclose(same[k], first[k], atol=1e-6) for k in first)
    further = train_node(dojo, model, data, steps=3, run_name="cont_c", continue_from=loaded).result[0]
    assert any(not torch.allclose(further[k], first[k]) for k in first)
    with pytest.raises(ValueError, match="has rank 4 but training uses rank 8: set rank to 4"):
        train_node(dojo, model, data, steps=1, rank=8, run_name="cont_d", continue_from=loaded)
