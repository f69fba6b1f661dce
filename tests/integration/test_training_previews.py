"""Sample previews while training (issue 17), through ComfyUI's own sampler on the model being trained:
files at the expected steps, the LoRA bit-identical with previews on and off, the step-0 preview equal
to a KSampler run on the base model, and Cancel during a preview behaving as Cancel during a step."""
import importlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from inprocess_models import tiny_flux_patcher, tiny_hunyuan_video_patcher, tiny_sd15_patcher
from test_lora_training import FAMILIES, encoded, job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in (
        "nodes.lora_training", "nodes.previews", "nodes.comfy_compat", "training.protocol", "training.batches",
        "training.encoded", "training.adapters", "training.loop", "training.textual_inversion",
        "nodes.ti_training")}
    return type("Dojo", (), {k.split(".")[-1]: v for k, v in mods.items()})


BUILD = {"sd15": tiny_sd15_patcher, "flux": tiny_flux_patcher, "hunyuan_video": tiny_hunyuan_video_patcher}


def load_vae(comfy, name):
    with torch.inference_mode():
        return comfy.nodes.NODE_CLASS_MAPPINGS["VAELoader"]().load_vae(name)[0]


def prompt_pair(family, seed=5):
    """CONDITIONING as text-encode nodes give it, at the tiny models' widths."""
    _, _, width, pooled, _ = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=g)}
    if family in ("flux", "hunyuan_video"):
        extra["guidance"] = 3.5
    return [[torch.randn(1, 7, width, generator=g), extra]]


def preview_request(dojo, family, vae, every=2, **kw):
    settings = dojo.previews.PreviewSettings(every=every, steps=2, seed=3, width=64, height=64, frames=5, **kw)
    return dojo.previews.PreviewRequest(settings, vae, prompt_pair(family), prompt_pair(family, seed=6))


VAE_FIXTURE = {"sd15": "tiny_sd_vae", "flux": "tiny_flux_vae", "hunyuan_video": "tiny_video_vae"}


@pytest.mark.parametrize("family,checkpointing", [("sd15", False), ("flux", True), ("hunyuan_video", True)])
def test_previews_at_the_expected_steps_leave_the_lora_bit_identical(comfy, dojo, tmp_path, request,
                                                                     family, checkpointing):
    vae = load_vae(comfy, request.getfixturevalue(VAE_FIXTURE[family]))
    data = encoded(dojo, family)
    plain = dojo.lora_training.train_lora(BUILD[family](), data, job(
        dojo, steps=5, gradient_checkpointing=checkpointing, checkpoint_dir=tmp_path / "plain"))
    cpu_rng = torch.get_rng_state()
    with_previews = dojo.lora_training.train_lora(BUILD[family](), data, job(
        dojo, steps=5, gradient_checkpointing=checkpointing, checkpoint_dir=tmp_path / "previews",
        previews=preview_request(dojo, family, vae)))
    assert sorted(plain.lora) == sorted(with_previews.lora)
    assert all(torch.equal(plain.lora[k], with_previews.lora[k]) for k in plain.lora)
    assert plain.losses == with_previews.losses
    assert torch.equal(torch.get_rng_state(), cpu_rng), "sampling moved the global RNG"

    # Before the first step, every 2 steps, and after the last one.
    assert [s.step for s in with_previews.samples] == [0, 2, 4, 5]
    suffix = ".webp" if family == "hunyuan_video" else ".png"
    files = sorted(p.name for p in (tmp_path / "previews" / "samples").iterdir())
    assert files == [f"step_{s:06d}{suffix}" for s in (0, 2, 4, 5)]
    assert not (tmp_path / "plain" / "samples").exists()
    with Image.open(tmp_path / "previews" / "samples" / f"step_000005{suffix}") as img:
        assert img.size == (64, 64)
        assert getattr(img, "n_frames", 1) == (5 if family == "hunyuan_video" else 1)
        last = np.asarray(img.convert("RGB"))
    assert np.array_equal(last, np.asarray(with_previews.samples[-1].frames[0]))
    first = np.asarray(with_previews.samples[0].frames[0], dtype=np.int16)
    assert np.abs(first - last.astype(np.int16)).max() > 0, "the previews do not follow the training"


def test_step_zero_preview_is_a_ksampler_run_on_the_base_model(comfy, dojo, tiny_sd_vae):
    """The preview is ComfyUI's sampler on the model being trained: before the first step (LoRA B = 0)
    that is exactly the base model, decoded as VAEDecode does."""
    vae = load_vae(comfy, tiny_sd_vae)
    patcher = tiny_sd15_patcher()
    req = preview_request(dojo, "sd15", vae, every=100)
    result = dojo.lora_training.train_lora(patcher, encoded(dojo), job(dojo, steps=1, previews=req))
    assert [s.step for s in result.samples] == [0, 1]
    nodes = comfy.nodes.NODE_CLASS_MAPPINGS
    s = req.settings
    with torch.inference_mode():
        latent = nodes["EmptyLatentImage"]().generate(s.width, s.height, 1)[0]
        sampled = nodes["KSampler"]().sample(patcher, s.seed, s.steps, 7.0, s.sampler, s.scheduler,
                                             req.positive, req.negative, latent)[0]
        decoded = nodes["VAEDecode"]().decode(vae, sampled)[0]
    expected = np.clip(decoded[0].float().numpy() * 255.0, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(result.samples[0].frames[0]), expected)
    assert not np.array_equal(np.asarray(result.samples[1].frames[0]), expected)


def run_with_interrupt(comfy, dojo, tmp_path, vae_name, during_preview: bool, at_forward: int = 2, every: int = 2):
    """Train 4 steps with a preview every 2; press Cancel (ComfyUI's real interrupt, which its ops raise
    from inside the next forward) either in the preview after step 2 or in training step 3. Returns
    what the run did and the checkpoints it left."""
    import comfy.model_management as mm
    vae = load_vae(comfy, vae_name)
    patcher = tiny_sd15_patcher()
    state = {"training_forwards": 0, "fired": False}

    def pre_hook(module, args):
        training = torch.is_grad_enabled()
        if training:
            state["training_forwards"] += 1
        due = (not training and during_preview and state["training_forwards"] == at_forward) or \
              (training and not during_preview and state["training_forwards"] == at_forward + 1)
        if due and not state["fired"]:
            state["fired"] = True
            mm.interrupt_current_processing(True)

    net = patcher.model.diffusion_model
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = {n: m.training for n, m in net.named_modules()}
    hook = net.register_forward_pre_hook(pre_hook)
    try:
        result = dojo.lora_training.train_lora(patcher, encoded(dojo), job(
            dojo, steps=4, checkpoint_dir=tmp_path, previews=preview_request(dojo, "sd15", vae, every=every)))
        outcome = ("returned", result.steps_done, result.cancelled)
    except BaseException as e:  # noqa: BLE001 (the interrupt is not an Exception in every version)
        outcome = ("raised", type(e).__name__)
    finally:
        hook.remove()
        mm.interrupt_current_processing(False)
    assert state["fired"]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert dict(net.named_modules()).keys() == modes.keys()  # the adapter layers are gone
    return outcome, sorted(p.name for p in tmp_path.glob("step_*"))


def test_cancel_during_a_preview_behaves_like_cancel_during_a_step(comfy, dojo, tmp_path, tiny_sd_vae):
    during_step = run_with_interrupt(comfy, dojo, tmp_path / "step", tiny_sd_vae, during_preview=False)
    during_preview = run_with_interrupt(comfy, dojo, tmp_path / "preview", tiny_sd_vae, during_preview=True)
    assert during_preview == during_step, (during_preview, during_step)
    assert during_step[0][0] in ("raised", "returned")
    if during_step[0][0] == "raised":
        assert during_step[0][1] == "InterruptProcessingException"


def test_textual_inversion_previews_use_the_embedding_as_it_stands_and_change_nothing(comfy, dojo, tmp_path,
                                                                                     tiny_sd15_checkpoint):
    from test_textual_inversion_nodes import CAPTIONS, latents
    from test_textual_inversion_nodes import job as ti_job
    ti = dojo.ti_training
    with torch.inference_mode():
        _, clip, vae = comfy.nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(
            tiny_sd15_checkpoint)[:3]
    settings = dojo.previews.PreviewSettings(every=2, steps=2, seed=3, width=64, height=64)
    plain = ti.train_embedding(tiny_sd15_patcher(), clip, latents(), CAPTIONS,
                               ti_job(dojo, steps=3, num_vectors=2, init_word="cat", checkpoint_dir=tmp_path / "a"))
    previewed = ti.train_embedding(tiny_sd15_patcher(), clip, latents(), CAPTIONS, ti_job(
        dojo, steps=3, num_vectors=2, init_word="cat", checkpoint_dir=tmp_path / "b",
        previews=dojo.previews.PreviewRequest(settings, vae, "a photo of {token}", "blurry")))
    assert torch.equal(plain.embedding.vectors["clip_l"], previewed.embedding.vectors["clip_l"])
    assert plain.losses == previewed.losses
    assert [s.step for s in previewed.samples] == [0, 2, 3]
    assert sorted(p.name for p in (tmp_path / "b" / "samples").iterdir()) == \
        ["step_000000.png", "step_000002.png", "step_000003.png"]
    first, last = (np.asarray(previewed.samples[i].frames[0], dtype=np.int16) for i in (0, -1))
    assert np.abs(first - last).max() > 0, "the previews do not see the embedding train"
    assert dojo.previews.embedding_prompt("a photo of {token}", "tiemb") == "a photo of embedding:tiemb"
    assert dojo.previews.embedding_prompt("a cat", "tiemb") == "embedding:tiemb a cat"


def test_cancel_during_the_last_preview_keeps_the_finished_run(comfy, dojo, tmp_path, tiny_sd_vae):
    outcome, checkpoints = run_with_interrupt(comfy, dojo, tmp_path, tiny_sd_vae, during_preview=True,
                                              at_forward=4, every=100)
    assert checkpoints == ["step_000004"]
    assert outcome[0] == "raised" or outcome[1:] == (4, False), outcome
