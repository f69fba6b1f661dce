"""Reliability cases at the node level (issue 8): LoRAs that do not fit, long captions, batch larger
than the dataset, out of memory, untrusted file names, and the base model's integrity after success,
cancel and error."""
import importlib
import logging
import sys

import pytest
import torch

from inprocess_models import tiny_sd15_patcher
from interrupts import interrupt_in_forward, is_comfy_interrupt
from test_lora_nodes import train_node
from test_lora_training import encoded, reference_output

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    names = ("nodes.train_lora", "nodes.lora_nodes", "nodes.lora_training", "nodes.comfy_compat", "nodes.comfy_model",
             "training.protocol", "training.batches", "training.encoded")
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in names}
    return type("Dojo", (), {k.split(".")[-1]: v for k, v in mods.items()})


def test_a_lora_for_another_model_size_is_refused_naming_the_shapes(comfy, dojo):
    small = tiny_sd15_patcher(model_channels=32)
    lora = train_node(dojo, small, encoded(dojo), steps=1, run_name="size_a").result[0]
    wider = tiny_sd15_patcher(model_channels=64)  # same family and key names, other widths
    with pytest.raises(ValueError, match=r"shapes that do not fit.*another size"):
        dojo.lora_nodes.DojoApplyLoRA.execute(wider, lora, 1.0)


def test_a_ten_thousand_token_caption_is_cut_with_a_warning(comfy, dojo, tiny_sd15_checkpoint, caplog):
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]()
    with torch.inference_mode():
        clip = loader.load_checkpoint(tiny_sd15_checkpoint)[1]
    caption = ", ".join(["a word"] * 5000)
    with caplog.at_level(logging.WARNING):
        cond, _ = dojo.comfy_compat.clip_encode(clip, caption)
    assert cond.shape[1] == 77 * dojo.comfy_compat.MAX_CAPTION_CHUNKS
    assert any("was cut" in r.getMessage() and "a word, a word" in r.getMessage() for r in caplog.records)


def test_batch_larger_than_the_dataset_trains_with_the_whole_dataset(comfy, dojo, caplog):
    with caplog.at_level(logging.WARNING):
        lora, losses, _ = train_node(dojo, tiny_sd15_patcher(), encoded(dojo, n=3), steps=2, batch_size=64,
                                     run_name="big_batch").result
    assert len(losses["loss"]) == 2
    assert any("batch size 64 is larger than the dataset (3 samples); using 3" in r.getMessage()
               for r in caplog.records)


def test_out_of_memory_is_caught_with_what_to_lower(comfy, dojo, monkeypatch):
    model = tiny_sd15_patcher()
    before = reference_output(dojo, model)
    view_cls = dojo.comfy_model.ComfyDenoisingModel
    real_predict = view_cls.predict
    calls = {"n": 0}

    def predict(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_predict(self, *args, **kwargs)
    monkeypatch.setattr(view_cls, "predict", predict)  # batch size 1, no planning step: call n is step n
    with pytest.raises(RuntimeError, match=r"out of memory at training step 3\. Lower batch_size.*step_000002 is kept"):
        train_node(dojo, model, encoded(dojo), steps=5, batch_size=1, checkpoint_every=2, run_name="oom",
                   memory_plan="off")  # the real allocation failure, not the planner's refusal
    monkeypatch.setattr(view_cls, "predict", real_predict)
    assert torch.equal(reference_output(dojo, model), before)  # and the base model is untouched


def test_untrusted_names_are_refused_by_every_file_node(comfy, dojo):
    lora = dojo.lora_training.DojoLoRA({"a.lora_down.weight": torch.zeros(1, 1)})
    for bad in ("../x", "/etc/x", "a/../../x"):
        with pytest.raises(ValueError):
            dojo.lora_nodes.DojoSaveLoRA.execute(lora, bad, "fp16")
        with pytest.raises(ValueError, match="run_name|resume_from"):
            train_node(dojo, tiny_sd15_patcher(), encoded(dojo), steps=1, run_name=bad)
        with pytest.raises((ValueError, FileNotFoundError)):
            train_node(dojo, tiny_sd15_patcher(), encoded(dojo), steps=1, resume_from=bad)
    with pytest.raises(FileNotFoundError, match="no LoRA named"):
        dojo.lora_nodes.DojoLoadLoRA.execute("../../../etc/passwd")


def test_the_base_model_is_bit_identical_after_success_cancel_and_error(comfy, dojo):
    model = tiny_sd15_patcher()
    before = reference_output(dojo, model)
    train_node(dojo, model, encoded(dojo), steps=2, run_name="integrity_ok")
    assert torch.equal(reference_output(dojo, model), before)

    with interrupt_in_forward(model.model.diffusion_model, call=2), pytest.raises(BaseException) as cancelled:
        train_node(dojo, model, encoded(dojo), steps=3, run_name="integrity_cancel")  # ComfyUI's cancel, mid-forward
    assert is_comfy_interrupt(cancelled.value)
    assert torch.equal(reference_output(dojo, model), before)

    bad = encoded(dojo)
    bad.samples[0].latent[0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="diverged"):
        train_node(dojo, model, bad, steps=3, batch_size=4, run_name="integrity_nan")
    assert torch.equal(reference_output(dojo, model), before)


def test_a_second_run_in_the_same_process_is_unaffected_by_the_first(comfy, dojo):
    model = tiny_sd15_patcher()
    first = train_node(dojo, model, encoded(dojo), steps=3, run_name="first").result[0]
    train_node(dojo, model, encoded(dojo, seed=5), steps=4, learning_rate=5e-3, run_name="other")
    again = train_node(dojo, model, encoded(dojo), steps=3, run_name="again").result[0]
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_an_embedding_whose_width_does_not_fit_the_clip_is_refused(comfy, tiny_sd15_checkpoint):
    pack = sys.modules[comfy.pack_module_name()].__name__
    embedding_nodes = importlib.import_module(f"{pack}.nodes.embedding_nodes")
    ti = importlib.import_module(f"{pack}.nodes.ti_training")
    with torch.inference_mode():
        clip = comfy.nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(tiny_sd15_checkpoint)[1]
    wrong = ti.DojoEmbedding("wide", {"clip_l": torch.zeros(2, 1024)}, {})
    with pytest.raises(ValueError, match="1024 wide but the CLIP's clip_l takes 768"):
        embedding_nodes.DojoApplyEmbedding.execute(clip, wrong)
