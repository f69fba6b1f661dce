"""The reliability suite of issue 14, against the real ComfyUI (run it on 0.33 and on 0.8): every bad name
input, ComfyUI's real cancel at any moment, kill -9 leftovers, a real full disk (tmpfs), a real memory
limit (RLIMIT_AS), special files, broken LoRAs, other families' latents, and the publish opt-in. Each
case asserts the message the user reads and that nothing written earlier was lost."""
import importlib
import logging
import os
import stat
import sys
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch

from faults import address_space_limit, fill, small_disk
from inprocess_models import tiny_flux_patcher, tiny_sd15_patcher
from interrupts import (interrupt_at_progress, interrupt_from_thread, interrupt_in_forward, is_comfy_interrupt,
                        is_fake)
from test_dataset_nodes import fresh_folder, image
from test_lora_nodes import train_node
from test_lora_training import encoded

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    names = ("nodes.train_lora", "nodes.lora_nodes", "nodes.lora_training", "nodes.comfy_compat", "nodes.share_nodes",
             "nodes.embedding_nodes", "nodes.ti_training", "nodes.dataset_nodes", "nodes.caption_nodes",
             "training.protocol", "training.batches", "training.encoded", "training.checkpoints", "training.hub")
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in names}
    return type("Dojo", (), {k.split(".")[-1]: v for k, v in mods.items()})


@pytest.fixture(scope="module")
def model(comfy):
    return tiny_sd15_patcher()


def tree(folder: Path) -> dict:
    """Every file under `folder` with its bytes' size and mtime: what must stay untouched."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


def loras_root(comfy) -> Path:
    return Path(comfy.folder_paths.get_folder_paths("loras")[0])


def embeddings_root(comfy) -> Path:
    return Path(comfy.folder_paths.get_folder_paths("embeddings")[0])


def a_lora(dojo):
    return dojo.lora_training.DojoLoRA({"x.lora_down.weight": torch.ones(2, 2), "x.lora_up.weight": torch.ones(2, 2)})


def an_embedding(dojo, name="emb"):
    return dojo.ti_training.DojoEmbedding(name, {"clip_l": torch.zeros(1, 768)}, {})


# --- 1. every name input, every bad name ---------------------------------------------------------------

BAD_NAMES = {
    ".": "itself|names the folder|cannot be used",
    "./": "itself|names the folder|cannot be used",
    "./.": "itself|names the folder|cannot be used",
    "a/..": r"contains '\.\.'|'\.\.' are refused|cannot be used",
    "bad\x00name": "null byte",
    "n" * 300: "300 characters long",
}


def call_with_name(comfy, dojo, model, which: str, name: str):
    if which == "save_lora.filename_prefix":
        return dojo.lora_nodes.DojoSaveLoRA.execute(a_lora(dojo), name, "fp16")
    if which == "save_embedding.filename_prefix":
        return dojo.embedding_nodes.DojoSaveEmbedding.execute(an_embedding(dojo), name, "fp32")
    if which == "train_lora.run_name":
        return train_node(dojo, model, encoded(dojo, n=2), steps=1, run_name=name)
    if which == "train_lora.resume_from":
        return train_node(dojo, model, encoded(dojo, n=2), steps=1, resume_from=name)
    if which == "publish.export":
        os.environ["DOJO_ALLOW_PUBLISH"] = "1"
        try:
            return dojo.share_nodes.DojoPublishToHub.execute("ann/x", True, export=name)
        finally:
            del os.environ["DOJO_ALLOW_PUBLISH"]
    if which == "train_ti.embedding_name":
        return dojo.embedding_nodes.DojoTrainTextualInversion.execute(
            None, None, None, None, name, "object", 1, "*", 1, 1, 1e-3, "constant", 0, "auto", "fp32", 0, 0, "r")
    if which == "export.name":
        return dojo.share_nodes.DojoExportModelCard.execute(name, "other", 1.0, lora=a_lora(dojo))


    if which == "dataset.folder":
        return dojo.dataset_nodes.DojoLoadImageDataset.execute(name, resolution=64, min_side=64, max_side=64)
    raise AssertionError(which)


NAME_INPUTS = ["dataset.folder", "save_lora.filename_prefix", "save_embedding.filename_prefix", "train_lora.run_name",
               "train_lora.resume_from", "publish.export", "train_ti.embedding_name", "export.name"]
# Export Model Card turns its name into a safe folder name ('.' becomes the default name): only the
# names no folder can take are refused there.
NAME_CASES = [(which, bad) for which in NAME_INPUTS for bad in BAD_NAMES
              if which != "export.name" or bad in ("bad\x00name", "n" * 300)]


@pytest.mark.parametrize("which,bad", NAME_CASES, ids=[f"{w}-{ascii(b)[:12]}" for w, b in NAME_CASES])
def test_a_bad_name_is_refused_with_a_clear_message_and_nothing_is_written(comfy, dojo, model, which, bad):
    base = comfy.base
    models_before, output_before = tree(base / "models"), tree(base / "output")
    with pytest.raises(ValueError) as err:
        call_with_name(comfy, dojo, model, which, bad)
    message = str(err.value)
    assert __import__("re").search(BAD_NAMES[bad], message), message
    assert "Errno" not in message and "embedded null byte" not in message
    assert tree(base / "models") == models_before and tree(base / "output") == output_before


@pytest.mark.parametrize("node", ["lora", "embedding"])
def test_a_dangling_symlink_at_the_next_free_name_is_skipped_and_never_written_through(comfy, dojo, tmp_path, node):
    root = loras_root(comfy) if node == "lora" else embeddings_root(comfy)
    (root / "dangle").mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "outside.safetensors"
    (root / "dangle" / f"{node}_00001.safetensors").symlink_to(outside)
    if node == "lora":
        saved = dojo.lora_nodes.DojoSaveLoRA.execute(a_lora(dojo), f"dangle/{node}", "fp16").result[0]
        assert saved == "dangle/lora_00002.safetensors"
    else:
        saved = dojo.embedding_nodes.DojoSaveEmbedding.execute(an_embedding(dojo), f"dangle/{node}", "fp32").result[0]
        assert saved == "embedding:dangle/embedding_00002"
    assert not outside.exists()


def test_saved_files_are_0644_like_comfyuis_own_outputs(comfy, dojo):
    old = os.umask(0o022)
    try:
        saved = dojo.lora_nodes.DojoSaveLoRA.execute(a_lora(dojo), "modes/m", "fp16").result[0]
    finally:
        os.umask(old)
    assert stat.S_IMODE((loras_root(comfy) / saved).stat().st_mode) == 0o644


# --- 2. ComfyUI's real cancel ------------------------------------------------------------------------

def test_cancel_from_another_thread_at_any_moment_keeps_the_last_step_and_resume_is_bit_identical(comfy, dojo,
                                                                                                   caplog):
    data = encoded(dojo, n=4)
    straight = train_node(dojo, tiny_sd15_patcher(), data, steps=10, run_name="thread_straight").result[0]
    model = tiny_sd15_patcher()
    forwards = {"n": 0}
    counter = model.model.diffusion_model.register_forward_pre_hook(
        lambda mod, args: None if any(is_fake(a) for a in args) else forwards.__setitem__("n", forwards["n"] + 1))
    # (only counts training forwards, not the memory planner's fake one; presses nothing)
    # Cancel as the server's /interrupt handler does: from another thread, at whatever point of a step
    try:
        with caplog.at_level(logging.INFO), interrupt_from_thread(lambda: forwards["n"] >= 4), \
                pytest.raises(BaseException) as stopped:
            train_node(dojo, model, data, steps=10, run_name="thread_cut")
    finally:
        counter.remove()
    assert is_comfy_interrupt(stopped.value)
    run = dojo.train_lora.checkpoint_root() / "thread_cut_00001"
    kept = [p.name for p in run.iterdir()]
    assert len(kept) == 1 and kept[0] >= "step_000003", kept
    assert f"set resume_from to 'thread_cut_00001'" in caplog.text
    resumed = train_node(dojo, tiny_sd15_patcher(), data, steps=10, run_name="x", resume_from="thread_cut_00001").result[0]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_cancel_pressed_between_steps_at_the_progress_bar_keeps_that_step(comfy, dojo):
    with interrupt_at_progress(2) as press, pytest.raises(BaseException) as stopped:
        train_node(dojo, tiny_sd15_patcher(), encoded(dojo, n=2), steps=8, run_name="bar_cut")
    assert is_comfy_interrupt(stopped.value) and 2 <= press["pressed_at"] < 8
    run = dojo.train_lora.checkpoint_root() / "bar_cut_00001"
    assert sorted(p.name for p in run.iterdir()) == [f"step_{press['pressed_at']:06d}"]


def test_cancel_inside_the_first_step_says_nothing_was_trained(comfy, dojo, caplog):
    model = tiny_sd15_patcher()
    with caplog.at_level(logging.WARNING), interrupt_in_forward(model.model.diffusion_model, 1), \
            pytest.raises(BaseException) as stopped:
        train_node(dojo, model, encoded(dojo, n=2), steps=5, run_name="first_cut")
    assert is_comfy_interrupt(stopped.value)
    assert "before the first step finished; nothing was trained" in caplog.text
    assert not (dojo.train_lora.checkpoint_root() / "first_cut_00001").exists() or \
        not list((dojo.train_lora.checkpoint_root() / "first_cut_00001").iterdir())


# --- 3. leftovers and branches ---------------------------------------------------------------------

def test_a_leftover_incomplete_step_folder_does_not_block_resume(comfy, dojo):
    data = encoded(dojo, n=2)
    straight = train_node(dojo, tiny_sd15_patcher(), data, steps=6, run_name="left_straight").result[0]
    train_node(dojo, tiny_sd15_patcher(), data, steps=6, run_name="left", checkpoint_every=2)
    run = dojo.train_lora.checkpoint_root() / "left_00001"
    for name in ("step_000004", "step_000006"):  # as a kill -9 in the middle of an old in-place write left them
        for f in (run / name).iterdir():
            f.unlink() if f.name == "state.json" else None
    (run / ".step_000005.dojo-999999-abc.tmp").mkdir()  # and a dead writer's temporary folder
    resumed = train_node(dojo, tiny_sd15_patcher(), data, steps=6, run_name="x", resume_from="left_00001").result[0]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    # the incomplete folders were removed; the resumed run (from step 2) wrote its final step 6 again, whole
    assert sorted(p.name for p in run.iterdir()) == ["step_000002", "step_000006"]
    assert (run / "step_000006" / "state.json").is_file()


def test_resuming_an_earlier_step_when_later_ones_exist_writes_a_new_branch_folder(comfy, dojo, caplog):
    data = encoded(dojo, n=2)
    train_node(dojo, tiny_sd15_patcher(), data, steps=8, run_name="branch", checkpoint_every=4)
    run = dojo.train_lora.checkpoint_root() / "branch_00001"
    before = tree(run)
    with caplog.at_level(logging.WARNING):
        lora = train_node(dojo, tiny_sd15_patcher(), data, steps=8, run_name="x",
                          resume_from="branch_00001/step_000004").result[0]
    assert lora and tree(run) == before  # nothing of the old run was touched
    branch = dojo.train_lora.checkpoint_root() / "branch_00001_from_step_000004_00001"
    assert (branch / "step_000008" / "state.json").is_file()
    assert "writes into the new folder" in caplog.text and str(branch) in caplog.text


def test_a_truncated_checkpoint_file_is_named_with_the_earlier_checkpoint_to_use(comfy, dojo):
    data = encoded(dojo, n=2)
    train_node(dojo, tiny_sd15_patcher(), data, steps=4, run_name="cut_file", checkpoint_every=2)
    bad = dojo.train_lora.checkpoint_root() / "cut_file_00001" / "step_000004" / "adapter.safetensors"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(ValueError, match=r"step_000004 is damaged: adapter.safetensors cannot be read.*"
                                         r"cut_file_00001/step_000002"):
        train_node(dojo, tiny_sd15_patcher(), data, steps=6, resume_from="cut_file_00001")


# --- 4. a real full disk ------------------------------------------------------------------------------

@pytest.fixture
def full_disk(comfy, tmp_path):
    """Mount a small tmpfs over a folder of ComfyUI's tree; yields a function that mounts it."""
    mounted = []

    def mount(folder: Path, size="2M"):
        cm = small_disk(folder, size)
        mounted.append(cm)
        return cm.__enter__()
    yield mount
    for cm in reversed(mounted):
        cm.__exit__(None, None, None)


def test_a_full_disk_at_save_lora_names_file_folder_and_size_and_keeps_earlier_files(comfy, dojo, full_disk):
    disk = full_disk(loras_root(comfy) / "small_disk")
    earlier = dojo.lora_nodes.DojoSaveLoRA.execute(a_lora(dojo), "small_disk/keep", "fp16").result[0]
    fill(disk, leave=100_000)
    big = dojo.lora_training.DojoLoRA({"x.lora_down.weight": torch.ones(600, 1000)})  # 1.2 MB at fp16
    with pytest.raises(OSError, match=rf"No space left on the disk to write big_00001.safetensors in {disk}: "
                                      r"it needs about 1\.1 MB and .* are free"):
        dojo.lora_nodes.DojoSaveLoRA.execute(big, "small_disk/big", "fp16")
    assert sorted(p.name for p in disk.iterdir()) == ["filler.bin", "keep_00001.safetensors"]
    assert safetensors.torch.load_file(str(loras_root(comfy) / earlier))["x.lora_up.weight"].shape == (2, 2)


def test_a_full_disk_at_save_embedding_names_the_file(comfy, dojo, full_disk):
    disk = full_disk(embeddings_root(comfy) / "small_disk")
    fill(disk, leave=20_000)
    big = dojo.ti_training.DojoEmbedding("big", {"clip_l": torch.zeros(16, 768)}, {})
    with pytest.raises(OSError, match=rf"to write e_00001.safetensors in {disk}"):
        dojo.embedding_nodes.DojoSaveEmbedding.execute(big, "small_disk/e", "fp32")
    assert sorted(p.name for p in disk.iterdir()) == ["filler.bin"]


def test_a_full_disk_at_export_leaves_no_partial_export_folder(comfy, dojo, full_disk):
    disk = full_disk(Path(comfy.folder_paths.get_output_directory()) / "dojo_exports")
    first = dojo.share_nodes.DojoExportModelCard.execute("pub", "other", 1.0, lora=a_lora(dojo)).result[0]
    before = tree(disk)
    fill(disk, leave=50_000)
    big = dojo.lora_training.DojoLoRA({"x.lora_down.weight": torch.ones(300, 1000)})  # 600 KB at fp16
    with pytest.raises(OSError, match=rf"No space left on the disk to write pub.safetensors in {disk}/pub_00002"):
        dojo.share_nodes.DojoExportModelCard.execute("pub", "other", 1.0, lora=big)
    assert sorted(p.name for p in disk.iterdir()) == ["filler.bin", first]  # no partial pub_00002, no temporary
    assert {k: v for k, v in tree(disk).items() if k != "filler.bin"} == before


def test_a_full_disk_at_a_checkpoint_names_it_and_keeps_the_earlier_checkpoint(comfy, dojo, full_disk):
    root = dojo.train_lora.checkpoint_root()
    disk = full_disk(root / "disk_run_00001", "3M")
    data = encoded(dojo, n=2)
    train_node(dojo, tiny_sd15_patcher(), data, steps=2, run_name="disk_src", checkpoint_every=2)
    src = root / "disk_src_00001" / "step_000002"
    import shutil
    shutil.copytree(src, disk / "step_000002")  # the run so far, on the small disk
    fill(disk, leave=20_000)
    with pytest.raises(ValueError, match=r"No space left on the disk to write step_000004 in .*disk_run_00001.*"
                                         r"step_000002 is kept"):
        train_node(dojo, tiny_sd15_patcher(), data, steps=4, resume_from="disk_run_00001")
    assert sorted(p.name for p in disk.iterdir()) == ["filler.bin", "step_000002"]
    assert tree(disk / "step_000002") == tree(src)


def test_a_full_disk_under_the_encode_cache_falls_back_to_memory_with_a_warning(comfy, dojo, full_disk, tiny_sd15_checkpoint):
    folder = fresh_folder(comfy, "disk_cache")
    for i in range(2):
        image(folder / f"i{i}.png", (64, 64), (40 * i, 0, 0), "a square")
    out = Path(comfy.folder_paths.get_output_directory())
    disk = full_disk(out / "dojo_cache", "1M")
    fill(disk, leave=4_000)
    with torch.inference_mode():
        _, clip, vae = comfy.nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(tiny_sd15_checkpoint)
        data = dojo.dataset_nodes.DojoLoadImageDataset.execute("disk_cache", resolution=64, min_side=64,
                                                               max_side=64).result[0]
        result = dojo.dataset_nodes.DojoEncodeDataset.execute(data, vae, clip, cache_to_disk=True)
    encoded_data = result.result[0]
    assert len(encoded_data) == 2
    text = result.ui["text"][0]
    assert "warning: the encode cache in" in text and "in memory only" in text


# --- 5. a real memory limit -------------------------------------------------------------------------------

def test_an_allocation_failure_while_encoding_gives_the_pack_message(comfy, dojo, tiny_sd15_checkpoint):
    folder = fresh_folder(comfy, "oom_encode")
    image(folder / "big.png", (2048, 2048), (10, 10, 10), "big")
    with torch.inference_mode():
        _, clip, vae = comfy.nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(tiny_sd15_checkpoint)
        data = dojo.dataset_nodes.DojoLoadImageDataset.execute("oom_encode", resolution=2048, min_side=64,
                                                               max_side=2048).result[0]
        with address_space_limit(256 << 20), pytest.raises(RuntimeError) as err:
            dojo.dataset_nodes.DojoEncodeDataset.execute(data, vae, clip)
    message = str(err.value)
    assert message.startswith("out of memory while encoding the dataset") and "max_side" in message
    assert type(err.value).__name__ == "DojoOutOfMemory"


def test_an_allocation_failure_in_training_gives_the_pack_message_naming_what_to_lower(comfy, dojo):
    model = tiny_sd15_patcher()
    big = encoded(dojo, n=1)
    big.samples[0] = dojo.batches.Sample(torch.randn(4, 256, 256), big.samples[0].cond)
    with address_space_limit(384 << 20), pytest.raises(RuntimeError) as err:
        train_node(dojo, model, big, steps=2, batch_size=1, run_name="oom_train",
                   memory_plan="off")  # the allocation failure itself; the planner would refuse first
    assert str(err.value).startswith("out of memory at training step 1. Lower batch_size")
    assert "no checkpoint had been written yet" in str(err.value)


# --- 6. datasets, broken LoRAs, wrong latents, untrue messages ----------------------------------------------

def test_a_fifo_in_a_dataset_is_skipped_and_listed_not_opened(comfy, dojo):
    folder = fresh_folder(comfy, "fifo_set")
    image(folder / "ok.png", (64, 64), (1, 2, 3), "fine")
    os.mkfifo(folder / "pipe.png")
    result = [None]
    worker = threading.Thread(target=lambda: result.__setitem__(0, dojo.dataset_nodes.DojoLoadImageDataset.execute(
        "fifo_set", resolution=64, min_side=64, max_side=64)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "Load Image Dataset hangs on a FIFO"
    text = result[0].ui["text"][0]
    assert "pipe.png: not a regular file (a FIFO / named pipe)" in text and len(result[0].result[0].items) == 1


def test_no_caption_and_no_trigger_warns_in_the_preview(comfy, dojo):
    folder = fresh_folder(comfy, "no_caps")
    image(folder / "a.png", (64, 64), (1, 2, 3))
    text = dojo.dataset_nodes.DojoLoadImageDataset.execute("no_caps", resolution=64, min_side=64,
                                                           max_side=64).ui["text"][0]
    assert "no item has a caption (.txt) and no trigger word is set" in text


@pytest.mark.parametrize("bad", ["nan", "inf", "bool"])
def test_a_lora_file_with_nan_inf_or_bool_tensors_is_refused_by_load_naming_the_tensor(comfy, dojo, bad):
    good = torch.ones(4, 4)
    t = {"nan": good.clone().fill_(float("nan")), "inf": good.clone().fill_(float("inf")),
         "bool": good.bool()}[bad]
    root = loras_root(comfy) / "broken"
    root.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"x.lora_down.weight": good, "x.lora_up.weight": t}, str(root / f"{bad}.safetensors"))
    expected = "not floating point" if bad == "bool" else "NaN or infinite values"
    with pytest.raises(ValueError, match=rf"{bad}.safetensors: tensor 'x.lora_up.weight' .*{expected}"):
        dojo.lora_nodes.DojoLoadLoRA.execute(f"broken/{bad}.safetensors")


def test_apply_and_continue_from_refuse_a_nan_or_bool_lora(comfy, dojo, model):
    trained = train_node(dojo, model, encoded(dojo, n=2), steps=1, run_name="nan_base").result[0]
    nan = dojo.lora_training.DojoLoRA({k: v.clone().fill_(float("nan")) for k, v in trained.items()}, trained.metadata)
    with pytest.raises(ValueError, match="Dojo Apply LoRA: tensor .* NaN or infinite"):
        dojo.lora_nodes.DojoApplyLoRA.execute(model, nan, 1.0)
    bools = dojo.lora_training.DojoLoRA({k: v.bool() for k, v in trained.items()}, trained.metadata)
    with pytest.raises(ValueError, match="continue_from: tensor .* is torch.bool, not floating point"):
        train_node(dojo, model, encoded(dojo, n=2), steps=1, run_name="nan_cont", continue_from=bools)


def test_latents_from_a_16_channel_vae_are_refused_for_sd15_in_words(comfy, dojo, model):
    data = encoded(dojo, family="flux", n=2)
    with pytest.raises(ValueError, match="these latents come from a 16-channel image VAE; this SD1.5 model needs "
                                         "its own 4-channel VAE"):
        train_node(dojo, model, data, steps=1, run_name="wrong_vae")


def test_latents_from_a_4_channel_vae_are_refused_for_flux_in_words(comfy, dojo):
    with pytest.raises(ValueError, match="these latents come from a 4-channel image VAE; this Flux model needs its "
                                         "own 16-channel VAE"):
        train_node(dojo, tiny_flux_patcher(), encoded(dojo, n=2), steps=1, run_name="wrong_vae_flux")


def test_a_diverged_run_says_truthfully_that_no_checkpoint_exists(comfy, dojo, model):
    bad = encoded(dojo, n=2)
    bad.samples[0].latent[0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="diverged.*No checkpoint had been written yet") as err:
        train_node(dojo, model, bad, steps=3, batch_size=2, run_name="diverged_none")
    assert "before step" not in str(err.value)


def test_continue_from_a_lora_of_the_same_rank_for_another_model_size_names_the_shape_not_the_rank(comfy, dojo):
    small = train_node(dojo, tiny_sd15_patcher(model_channels=32), encoded(dojo, n=2), steps=1,
                       run_name="size_src").result[0]
    with pytest.raises(ValueError, match=r"another size of this model family \(the rank, 4, already matches\)") as err:
        train_node(dojo, tiny_sd15_patcher(model_channels=64), encoded(dojo, n=2), steps=1, run_name="size_dst",
                   continue_from=small)
    assert "set rank" not in str(err.value)


# --- 7. publishing needs the owner's opt-in; Write Captions keeps backups ------------------------------------

def test_publish_is_refused_until_the_server_owner_opts_in_and_says_how(comfy, dojo, monkeypatch):
    monkeypatch.delenv("DOJO_ALLOW_PUBLISH", raising=False)
    with pytest.raises(RuntimeError, match=r"publishing is off on this ComfyUI.*DOJO_ALLOW_PUBLISH=1.*"
                                           r"comfyui-dojo.json. Nothing was uploaded"):
        dojo.share_nodes.DojoPublishToHub.execute("ann/x", True, export="anything")


def test_write_captions_with_overwrite_keeps_each_old_caption_as_bak(comfy, dojo):
    folder = fresh_folder(comfy, "bak_set")
    image(folder / "a.png", (64, 64), (1, 2, 3), "the user's own words")
    (folder / "a.txt.bak").write_text("an older backup")
    data = dojo.dataset_nodes.DojoLoadImageDataset.execute("bak_set", resolution=64, min_side=64,
                                                           max_side=64).result[0]
    edited = dojo.caption_nodes.DojoSetCaptions.execute(data, "order", captions=["new words"]).result[0]
    text = dojo.caption_nodes.DojoWriteCaptions.execute(edited, True, False).result[0]
    assert (folder / "a.txt").read_text().strip() == "new words"
    assert (folder / "a.txt.bak").read_text() == "an older backup"  # an existing backup is never replaced
    assert (folder / "a.txt.00001.bak").read_text() == "the user's own words"
    assert "kept as .txt.bak" in text


def test_a_resumed_run_cancelled_before_its_first_new_step_keeps_the_checkpoint_it_resumed(comfy, dojo, caplog):
    data = encoded(dojo, n=2)
    train_node(dojo, tiny_sd15_patcher(), data, steps=3, run_name="re_cut", checkpoint_every=3)
    model = tiny_sd15_patcher()
    with caplog.at_level(logging.WARNING), interrupt_in_forward(model.model.diffusion_model, 1), \
            pytest.raises(BaseException) as stopped:
        train_node(dojo, model, data, steps=6, run_name="x", resume_from="re_cut_00001")
    assert is_comfy_interrupt(stopped.value)
    run = dojo.train_lora.checkpoint_root() / "re_cut_00001"
    assert sorted(p.name for p in run.iterdir()) == ["step_000003"]
    assert "training cancelled at step 3 of 6" in caplog.text and "set resume_from to 're_cut_00001'" in caplog.text
