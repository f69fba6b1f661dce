"""The memory planner through ComfyUI's real models (issue 16): a plan is computed and shown for every
family (LoRA and textual inversion, and by Dojo Estimate Memory); under a real address-space limit set
with prlimit on a training process, 'auto' turns a job that fails for memory into one that finishes by
choosing checkpointing, an explicit setting is kept and refused before step 1 with the settings that
would fit, and the same job without the plan really fails at step 1."""
import importlib
import json
import logging
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_lora_training import FAMILIES, encoded, job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in (
        "nodes.lora_training", "nodes.memory_planning", "nodes.memory_nodes", "nodes.comfy_compat", "nodes.previews",
        "nodes.te_lora",
        "nodes.comfy_model", "nodes.ti_training", "training.protocol", "training.batches", "training.encoded",
        "training.adapters", "training.loop", "training.memory_plan", "training.textual_inversion")}
    return type("Dojo", (), {k.split(".")[-1]: v for k, v in mods.items()})


def plan_logs(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Dojo memory plan: ")]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_is_computed_and_shown_for_every_family(comfy, dojo, family, caplog):
    patcher = FAMILIES[family][0]()
    data = encoded(dojo, family)
    weights = sum(t.numel() * t.element_size() for t in
                  list(patcher.model.diffusion_model.parameters()) + list(patcher.model.diffusion_model.buffers()))
    with caplog.at_level(logging.INFO, logger="comfyui-dojo"):
        result = dojo.lora_training.train_lora(patcher, data, job(dojo, steps=1,
                                                                  memory_plan=dojo.memory_planning.PlanRequest()))
    p = result.memory_plan
    assert p.fits and result.steps_done == 1
    assert p.estimate.weights == weights and p.estimate.activations > 0 and p.estimate.adapter > 0
    assert [m for m in plan_logs(caplog) if m.startswith(f"Dojo memory plan: {p.summary()}")]
    assert "est. " in p.summary() and " free: checkpointing " in p.summary()
    used = json.loads(result.lora.metadata["dojo_training"])
    assert used["gradient_checkpointing"] == p.checkpointing
    # Dojo Estimate Memory reports the same plan without training.
    text = dojo.memory_nodes.DojoEstimateMemory.execute(
        patcher, data, batch_size=2, rank=4, targets="all_linear", adapter="lora", optimizer="adamw",
        gradient_checkpointing="off" if not p.checkpointing else "on", blocks_to_swap=0, precision="fp32").result[0]
    assert text.splitlines()[0].split(" of ")[0] == p.summary().split(" of ")[0]
    assert "checkpointing" in text and "available:" in text


def test_a_bigger_batch_measures_more_and_checkpointing_measures_less(comfy, dojo):
    patcher = FAMILIES["flux"][0]()
    # Latents big enough (64 x 64: 1,024 image tokens) that the saved activations, not one block's
    # recomputation, set the peak without checkpointing.
    small = encoded(dojo, "flux", n=4)
    g = torch.Generator().manual_seed(0)
    data = dojo.encoded.EncodedDataset([dojo.batches.Sample(torch.randn(s.latent.shape[0], 64, 64, generator=g), s.cond)
                                        for s in small.samples], small.captions)

    def estimate(batch, gc):
        _, figures = dojo.memory_nodes.estimate_lora_memory(
            patcher, data, batch_size=batch, rank=4, targets="all_linear", adapter="lora", optimizer="adamw",
            gradient_checkpointing=gc, blocks_to_swap=0, precision="bf16")
        return figures["activations"]
    # (The measured activations: the total also holds the CPU's kernel and heap overhead, which on a
    # model this small is much of it and depends on the process's heap.)
    assert estimate(4, "off") > estimate(1, "off") > estimate(1, "on")


def test_textual_inversion_plans_before_step_1(comfy, dojo, tiny_sd15_checkpoint, caplog):
    from test_textual_inversion_nodes import CAPTIONS, latents, load_checkpoint
    from test_textual_inversion_nodes import job as ti_job
    model, clip, _ = load_checkpoint(comfy, tiny_sd15_checkpoint)
    with caplog.at_level(logging.INFO, logger="comfyui-dojo"):
        result = dojo.ti_training.train_embedding(model, clip, latents(), CAPTIONS,
                                                  ti_job(dojo, steps=1, memory_plan=True))
    assert result.memory_plan.fits and result.steps_done == 1
    assert result.memory_plan.estimate.activations > 0
    assert [m for m in plan_logs(caplog) if result.memory_plan.summary() in m]


def run_under_limit(comfy, scenarios):
    """Start memory_limit_job.py, set an address-space limit on it with prlimit between what the job's
    step needs with checkpointing and without, and run `scenarios` under it."""
    child = subprocess.Popen([sys.executable, str(Path(__file__).with_name("memory_limit_job.py")), str(comfy.root)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    try:
        ready = None
        for line in child.stdout:
            if line.startswith("{"):
                ready = json.loads(line)
                break
        assert ready and ready["ready"], child.stderr.read()[-3000:]
        weights = ready["weights"]
        need_on, need_off = ready["on"] - weights, ready["off"] - weights
        assert need_off > 2 * need_on, ready  # a job where checkpointing matters
        # Room above the address space in use: the planner's margin (8% + 160 MB) on top of a point a
        # quarter of the way from the checkpointed need to the unchecked one.
        target = need_on + (need_off - need_on) // 4
        room = int((target + 160 * 2**20 + 0.08 * weights) / 0.92)
        limit = ready["vmsize"] + room
        resource.prlimit(child.pid, resource.RLIMIT_AS, (limit, limit))
        out, err = child.communicate(" ".join(scenarios) + "\n", timeout=900)
    finally:
        if child.poll() is None:
            child.kill()
    results = [json.loads(line) for line in out.splitlines() if line.startswith('{"scenario"')]
    assert [r["scenario"] for r in results] == scenarios, err[-3000:]
    return {r["scenario"]: r for r in results}, ready, room


def test_under_a_real_memory_limit_auto_makes_the_job_fit_and_unplanned_fails(comfy, dojo):
    results, ready, room = run_under_limit(comfy, ["auto", "explicit_off", "unplanned_off"])
    auto, explicit, unplanned = results["auto"], results["explicit_off"], results["unplanned_off"]
    # auto: the plan turns checkpointing on (the job starts from 'off') and the job finishes.
    assert auto.get("finished") == 2 and auto["checkpointing"] is True, auto
    assert "checkpointing on" in auto["summary"]
    # The user's explicit 'off' is kept, so the job is refused before step 1, naming what would fit.
    assert explicit.get("error") == "MemoryPlanRefused", explicit
    assert "gradient_checkpointing on" in explicit["message"] and "free" in explicit["message"]
    # Without the plan, the same job really runs out of memory in step 1.
    assert unplanned.get("error") == "TrainingOutOfMemory" and unplanned["steps_before"] == 1, unplanned


def fake_steps(monkeypatch):
    """The fake-tensor modes entered (each once, though torch re-enters them op by op): each measured
    step runs in one of its own (torch's class)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    entered = []
    original = FakeTensorMode.__enter__

    def enter(self):
        if not any(m is self for m in entered):
            entered.append(self)
        return original(self)
    monkeypatch.setattr(FakeTensorMode, "__enter__", enter)
    return entered


def test_a_second_start_of_the_same_job_reuses_the_measurement(comfy, dojo, monkeypatch, caplog, tmp_path):
    # A ComfyUI that has not planned anything yet: a new user directory, nothing measured in this process.
    monkeypatch.setattr(comfy.folder_paths, "user_directory", str(tmp_path))
    monkeypatch.setattr(dojo.memory_planning, "_CACHES", {})
    entered = fake_steps(monkeypatch)
    patcher = FAMILIES["flux"][0]()
    data = encoded(dojo, "flux")
    train = lambda **kw: dojo.lora_training.train_lora(  # noqa: E731
        patcher, data, job(dojo, steps=1, memory_plan=dojo.memory_planning.PlanRequest(), **kw))
    first = train().memory_plan
    measured = len(entered)
    assert measured >= 1
    with caplog.at_level(logging.INFO, logger="comfyui-dojo"):
        second = train().memory_plan
    assert len(entered) == measured  # no fake step ran
    assert second.estimate == first.estimate and second.chosen == first.chosen
    assert any(m.startswith("Dojo memory plan: reusing the measured step") for m in plan_logs(caplog))
    # On disk under ComfyUI's user directory: a fresh process's cache (a restart) reads it back.
    folder = tmp_path / "dojo" / "memory-plan"
    assert len(list(folder.glob("*.json"))) == measured
    monkeypatch.setattr(dojo.memory_planning, "_CACHES", {})
    assert train().memory_plan.estimate == first.estimate and len(entered) == measured
    # A different job (another batch shape, other trainable parameters) is measured again.
    train(gradient_checkpointing=True)
    assert len(entered) > measured
    now = len(entered)
    dojo.lora_training.train_lora(patcher, encoded(dojo, "flux", n=1), job(
        dojo, steps=1, memory_plan=dojo.memory_planning.PlanRequest()))
    assert len(entered) > now


def test_a_preview_bigger_than_the_training_bucket_is_planned(comfy, dojo, tiny_sd_vae):
    from test_training_previews import load_vae, prompt_pair
    patcher = FAMILIES["sd15"][0]()
    data = encoded(dojo, "sd15")  # 16 x 16 latents
    vae = load_vae(comfy, tiny_sd_vae)

    def planned(side=None):
        previews = None if side is None else dojo.previews.PreviewRequest(
            dojo.previews.PreviewSettings(every=1, steps=1, seed=3, width=side, height=side), vae,
            prompt_pair("sd15"), prompt_pair("sd15", seed=6))
        return dojo.lora_training.train_lora(patcher, data, job(
            dojo, steps=1, previews=previews, memory_plan=dojo.memory_planning.PlanRequest())).memory_plan.estimate
    base, small, big = planned(), planned(64), planned(384)
    assert base.preview == 0
    # A 64 px preview (8 x 8 latents, cfg batch 2) needs less than the step: the step sets the estimate.
    assert 0 < small.preview < base.activations and small.activations == base.activations
    # A 384 px preview (48 x 48 latents) needs more than a training step on 16 x 16: it sets it.
    assert big.preview > base.activations and big.activations == big.preview and big.preview_dominates
    assert "preview" in big.parts()


def test_a_text_encoder_lora_job_plans_the_joint_step_and_the_clips_weights(comfy, dojo, tiny_sd15_checkpoint):
    from dataclasses import replace
    from test_te_lora import dataset as te_dataset
    from test_te_lora import te_job
    from test_textual_inversion_nodes import load_checkpoint
    model, clip, _ = load_checkpoint(comfy, tiny_sd15_checkpoint)
    both = replace(te_job(dojo, clip, steps=1), memory_plan=dojo.memory_planning.PlanRequest())
    unet = dojo.lora_training.train_lora(model, te_dataset(dojo), replace(both, text_encoder=None)).memory_plan
    joint = dojo.lora_training.train_lora(model, te_dataset(dojo), both).memory_plan
    net = clip.cond_stage_model
    clip_bytes = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    assert joint.fits and joint.estimate.weights - unet.estimate.weights == clip_bytes  # the CLIP is resident
    assert joint.estimate.adapter > unet.estimate.adapter  # the text encoder's LoRA and its optimizer state
    assert joint.estimate.activations > unet.estimate.activations  # the CLIP's forward + backward in the step
