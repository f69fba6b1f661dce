"""Dojo LoRA Grid (issue 17): 3 checkpoints x 3 strengths x 2 seeds on SD1.5 and HunyuanVideo stand-ins,
the strength-0 column bit-identical to a KSampler run on the base model, the labels drawn outside the
cells, and a missing or mismatched LoRA refused by name before anything is applied or sampled."""
import importlib
import sys
import uuid

import numpy as np
import pytest
import torch

from inprocess_models import tiny_hunyuan_video_patcher, tiny_sd15_patcher
from test_lora_training import encoded, job
from test_training_previews import load_vae, prompt_pair

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in (
        "nodes.lora_training", "nodes.grid_nodes", "nodes.lora_nodes", "nodes.train_lora", "training.protocol",
        "training.batches", "training.encoded", "training.adapters", "training.loop", "training.image_grid")}
    return type("Dojo", (), {k.split(".")[-1]: v for k, v in mods.items()})


FAMILY = {  # family -> (patcher builder, VAE fixture, empty latent for the grid, cfg)
    "sd15": (tiny_sd15_patcher, "tiny_sd_vae", torch.zeros(1, 4, 8, 8), 7.0),
    "hunyuan_video": (tiny_hunyuan_video_patcher, "tiny_video_vae", torch.zeros(1, 16, 2, 8, 8), 1.0),
}


def trained_run(dojo, family, steps=3):
    """A Train LoRA run folder in output/dojo_checkpoints with a checkpoint at every step."""
    name = f"grid_{family}_{uuid.uuid4().hex[:6]}"
    folder = dojo.train_lora.checkpoint_root() / name
    result = dojo.lora_training.train_lora(FAMILY[family][0](), encoded(dojo, family), job(
        dojo, steps=steps, checkpoint_every=1, checkpoint_dir=folder))
    return name, result


def run_grid(dojo, model, vae, family, **kw):
    args = dict(model=model, vae=vae, positive=prompt_pair(family), negative=prompt_pair(family, seed=6),
                latent={"samples": FAMILY[family][2]}, strengths="0, 1.0, 1.4", seeds="1, 2", steps=2,
                cfg=FAMILY[family][3], sampler_name="euler", scheduler="simple")
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return dojo.grid_nodes.DojoLoRAGrid.execute(**args)


def ksampler_middle_frame(comfy, model, vae, family, seed):
    nodes = comfy.nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        sampled = nodes["KSampler"]().sample(model, seed, 2, FAMILY[family][3], "euler", "simple",
                                             prompt_pair(family), prompt_pair(family, seed=6),
                                             {"samples": FAMILY[family][2]})[0]
        frames = nodes["VAEDecode"]().decode(vae, sampled)[0]
    return frames[frames.shape[0] // 2].float()


@pytest.mark.parametrize("family", list(FAMILY))
def test_grid_of_three_checkpoints_three_strengths_two_seeds(comfy, dojo, request, family):
    vae = load_vae(comfy, request.getfixturevalue(FAMILY[family][1]))
    run, _ = trained_run(dojo, family)
    model = FAMILY[family][0]()
    out = run_grid(dojo, model, vae, family, run_folder=run)
    grid, batch = out.result
    assert batch.shape == (3 * 3 * 2, 64, 64, 3)
    cells = batch.reshape(3, 6, 64, 64, 3)

    # Strength 0 (columns 0 and 1) is the base model: bit for bit what KSampler + VAEDecode give, in every row.
    for k, seed in enumerate((1, 2)):
        base = ksampler_middle_frame(comfy, model, vae, family, seed)
        for row in range(3):
            assert torch.equal(cells[row, k], base)
    assert not torch.equal(cells[0, 0], cells[0, 1]), "the two seeds gave the same image"
    # The LoRA columns differ from the base, from each other, and between checkpoints.
    for row in range(3):
        assert not torch.equal(cells[row, 2], cells[row, 0])
        assert not torch.equal(cells[row, 2], cells[row, 4])
    assert not torch.equal(cells[0, 4], cells[2, 4])

    # The grid: labels left of and above the cells; each cell's pixels placed unchanged.
    image = dojo.image_grid
    labels = [f"step {s}" for s in (1, 2, 3)]
    expected = image.labelled_grid([[image.to_pil(c.numpy()) for c in row] for row in cells], labels,
                                   [[f"strength {s:g}", f"seed {seed}"] for s in (0, 1.0, 1.4) for seed in (1, 2)])
    pixels = np.round(grid[0].numpy() * 255).astype(np.uint8)
    assert np.array_equal(pixels, np.asarray(expected))
    assert grid.shape[1] > 3 * 64 and grid.shape[2] > 6 * 64
    header = pixels[:20, 100:]
    left = pixels[40:, :30]
    assert (header < 128).any() and (left < 128).any(), "no labels were drawn"
    assert out.ui.as_dict()["images"]


def test_loras_as_inputs_and_clear_errors_that_apply_nothing(comfy, dojo, tiny_sd_vae):
    vae = load_vae(comfy, tiny_sd_vae)
    _, sd_result = trained_run(dojo, "sd15", steps=1)
    _, hv_result = trained_run(dojo, "hunyuan_video", steps=1)
    model = tiny_sd15_patcher()
    # A LoRA of the same family trained on a wider UNet: its layers do not fit.
    wide = dojo.lora_training.train_lora(tiny_sd15_patcher(model_channels=64), encoded(dojo), job(dojo, steps=1))
    calls = []
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        cases = [(dict(lora_1=sd_result.lora, lora_2=hv_result.lora), "lora_2", dojo.lora_nodes.LoraDoesNotFit),
                 (dict(lora_1=sd_result.lora, lora_3=wide.lora), "lora_3", dojo.lora_nodes.LoraDoesNotFit),
                 (dict(lora_1=sd_result.lora, run_folder="no_such_run"), "no_such_run", FileNotFoundError),
                 (dict(), "lora_1", ValueError)]
        for kwargs, named, error in cases:
            with pytest.raises(error) as info:
                run_grid(dojo, model, vae, "sd15", **kwargs)
            assert named in str(info.value)
        with pytest.raises(ValueError, match="lora_1 comes from elsewhere"):  # not straight from Train LoRA
            run_grid(dojo, model, vae, "sd15", lora_1=sd_result.lora, rows="run checkpoints")
        with pytest.raises(ValueError, match="strengths"):
            run_grid(dojo, model, vae, "sd15", lora_1=sd_result.lora, strengths="0, strong")
        assert calls == [], "something was sampled before the error"
        assert model.patches == {}
    finally:
        hook.remove()

    out = run_grid(dojo, model, vae, "sd15", lora_1=sd_result.lora, lora_2=sd_result.lora,
                   strengths="0, 1", seeds="3")
    grid, batch = out.result
    assert batch.shape == (2 * 2, 64, 64, 3)
    assert torch.equal(batch[0], batch[2]) and torch.equal(batch[1], batch[3])  # the same LoRA twice
    assert model.patches == {}
