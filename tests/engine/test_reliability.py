"""Reliability cases of the engine (issues 8 and 14) that are not already covered beside their feature:
degenerate and oversized images, special files, a real full disk (tmpfs), kill -9 during writes, atomic
checkpoints and their branches, file modes, cancel from inside the forward."""
import json
import os
import random
import stat
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from comfyui_dojo.training.adapters import AdapterConfig, attach_adapter
from comfyui_dojo.training.batches import BatchSchedule
from comfyui_dojo.training.checkpoints import (CheckpointError, checkpoint_step, latest_checkpoint, load_checkpoint,
                                               plan_run_folders, save_checkpoint)
from comfyui_dojo.training.datasets import DatasetConfig, DatasetError, scan_folder
from comfyui_dojo.training.datasets.captions import CaptionConfig
from comfyui_dojo.training.datasets.graph_captions import with_raw_captions, write_captions
from comfyui_dojo.training.encode_cache import EncodeCache
from comfyui_dojo.training.files import DiskFullError, next_free_path, save_safetensors_new
from comfyui_dojo.training.hub import publish_allowed
from comfyui_dojo.training.loop import Callbacks, Precision, TrainConfig, train
from comfyui_dojo.training.protocol import TargetPreset

from faults import fill, kill_while_running, small_disk
from helpers import tiny_samples, tiny_unet_model
from pack_import import PACK_IMPORT_SNIPPET


def skipped_reasons(dataset):
    return {path.name: reason for path, reason in dataset.skipped}


def test_a_one_pixel_image_is_skipped_with_its_size(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "fine.png")
    with pytest.warns(UserWarning, match="dot.png"):
        dataset = scan_folder(tmp_path, DatasetConfig())
    assert [i.path.name for i in dataset.items] == ["fine.png"]
    assert "too small (1x1)" in skipped_reasons(dataset)["dot.png"]


def test_a_huge_image_is_refused_from_its_header_without_decoding(tmp_path):
    # 20000 x 5001 = 100.02 MP: just over the limit. A 1-bit image keeps this test's own memory small.
    Image.new("1", (20000, 5001)).save(tmp_path / "panorama.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "fine.png")
    with pytest.warns(UserWarning, match="panorama.png"):
        dataset = scan_folder(tmp_path, DatasetConfig())
    reason = skipped_reasons(dataset)["panorama.png"]
    assert "too large to decode safely (20000x5001" in reason and "downscale" in reason


def test_a_very_wide_image_within_the_limit_is_cropped_to_a_bucket_not_refused(tmp_path):
    Image.new("RGB", (20000, 300), (10, 20, 30)).save(tmp_path / "strip.png")
    dataset = scan_folder(tmp_path, DatasetConfig())
    item, = dataset.items
    h, w, t = item.bucket
    assert w <= dataset.config.buckets.max_side and item.load().shape == (1, 3, h, w)


def test_a_folder_of_only_unusable_images_is_an_error_not_an_empty_dataset(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "a.png")
    Image.new("RGB", (2, 3)).save(tmp_path / "b.png")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="every file"):
        scan_folder(tmp_path, DatasetConfig())


def optimizer_for(tensor):
    param = torch.nn.Parameter(tensor.clone())
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones_like(param)
    optimizer.step()
    return param, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def checkpoint(folder, step, size=1000):
    param, optimizer, scheduler = optimizer_for(torch.full((size,), float(step)))
    return save_checkpoint(folder, step, [1.0] * step, {"w": param.detach()}, optimizer, scheduler, {"seed": 0})


def listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# --- a real full disk (tmpfs) -----------------------------------------------------------------------

def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_names_folder_and_size(tmp_path):
    with small_disk(tmp_path / "disk", "2M") as disk:
        run = disk / "run"
        first = checkpoint(run, 10, size=1000)
        fill(disk, leave=200_000)
        with pytest.raises(CheckpointError) as err:
            checkpoint(run, 20, size=100_000)  # ~1.2 MB of weights and optimizer state
        message = str(err.value)
        assert f"step_000020 in {run}" in message and "it needs about 1.1 MB" in message
        assert "free" in message and "step_000010 is kept" in message
        assert listing(run) == ["step_000010"]  # no half checkpoint, no temporary folder
        assert load_checkpoint(first).step == 10


def test_a_full_disk_while_saving_a_file_names_it_removes_the_partial_file_and_keeps_the_others(tmp_path):
    with small_disk(tmp_path / "disk", "2M") as disk:
        earlier = save_safetensors_new(next_free_path(disk / "loras", "mine", ".safetensors"), {"w": torch.ones(100)})
        fill(disk, leave=100_000)
        target = next_free_path(disk / "loras", "mine", ".safetensors")
        with pytest.raises(DiskFullError) as err:
            save_safetensors_new(target, {"w": torch.ones(300_000)})
        assert f"mine_00002.safetensors in {disk / 'loras'}: it needs about 1.1 MB" in str(err.value)
        assert listing(disk / "loras") == ["mine_00001.safetensors"]
        assert torch.equal(safetensors.torch.load_file(str(earlier))["w"], torch.ones(100))


def test_a_full_disk_under_the_encode_cache_falls_back_to_memory_with_a_warning(tmp_path, caplog):
    with small_disk(tmp_path / "disk", "1M") as disk:
        cache = EncodeCache(disk / "cache")
        cache.put_latent("small", torch.ones(10))
        fill(disk, leave=50_000)
        cache.put_latent("big", torch.ones(500_000))  # 2 MB: does not fit, and must not raise
        cache.put_latent("after", torch.ones(10))     # writing has stopped
        cache.flush()
        assert cache.warning and "cannot be written" in cache.warning and "in memory" in cache.warning
        assert any("encode cache" in r.getMessage() for r in caplog.records)
        again = EncodeCache(disk / "cache")
        assert torch.equal(again.get_latent("small"), torch.ones(10)) and again.get_latent("big") is None
        assert not any(p.name.endswith(".tmp") for p in (disk / "cache").rglob("*"))


# --- kill -9 during writes -------------------------------------------------------------------------

CHECKPOINT_WRITER = PACK_IMPORT_SNIPPET + textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from comfyui_dojo.training.checkpoints import save_checkpoint
    run, start = Path(sys.argv[1]), int(sys.argv[2])
    param = torch.nn.Parameter(torch.zeros(1_000_000))
    optimizer = torch.optim.AdamW([param]); param.grad = torch.ones_like(param); optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    print("ready", flush=True)
    for step in range(start, start + 1000):
        param.data.fill_(step)
        save_checkpoint(run, step, [0.5] * step, {"w": param.detach()}, optimizer, scheduler, {"seed": 0})
        print("wrote", step, flush=True)
""")


def test_kill_9_at_any_moment_of_checkpoint_writes_leaves_only_complete_checkpoints(tmp_path):
    run, rng, start, mid_write = tmp_path / "run", random.Random(14), 1, 0
    for attempt in range(5):
        kill_while_running([sys.executable, "-c", CHECKPOINT_WRITER, str(run), str(start)],
                           rng.uniform(0.0, 0.6), ready_line="ready")
        steps = [p for p in run.glob("step_*")]
        assert all((p / "state.json").is_file() for p in steps), listing(run)  # never a half folder
        for p in steps:  # each loads whole, with the values of its own step
            w = load_checkpoint(p).adapter["w"]
            assert torch.all(w == w[0]) and abs(w[0].item() - int(p.name[5:])) <= 0.01 * int(p.name[5:])
        mid_write += any(n.startswith(".step_") for n in listing(run))  # killed inside a write
        latest = latest_checkpoint(run)
        start = (int(latest.name[5:]) if latest else 0) + 1
        written = checkpoint(run, start)  # resume writes the next step: nothing blocks it
        assert written.name == f"step_{start:06d}"
        assert not [n for n in listing(run) if n.startswith(".")], listing(run)  # the dead writer's temporaries went
        start += 1
    assert mid_write >= 2  # the kills did land inside checkpoint writes


FILE_WRITER = PACK_IMPORT_SNIPPET + textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from comfyui_dojo.training.files import next_free_path, save_safetensors_new
    folder = Path(sys.argv[1])
    big = {"w": torch.ones(20_000_000)}
    print("ready", flush=True)
    while True:
        save_safetensors_new(next_free_path(folder, "lora", ".safetensors"), big)
""")


def test_kill_9_during_a_save_leaves_no_partial_file_and_the_next_save_removes_the_temporary(tmp_path):
    folder, rng = tmp_path / "loras", random.Random(3)
    for attempt in range(4):
        kill_while_running([sys.executable, "-c", FILE_WRITER, str(folder)], rng.uniform(0.05, 0.5),
                           ready_line="ready")
        for f in folder.glob("lora_*.safetensors"):  # every listed file is complete
            assert safetensors.torch.load_file(str(f))["w"].shape == (20_000_000,)
        hidden = [n for n in listing(folder) if not n.endswith(".safetensors")]
        assert all(n.startswith(".lora_") and ".dojo-" in n and n.endswith(".tmp") for n in hidden), hidden
        save_safetensors_new(next_free_path(folder, "other", ".safetensors"), {"w": torch.ones(3)})
        assert all(n.endswith(".safetensors") for n in listing(folder)), listing(folder)


# --- checkpoints: leftovers, branches, damage ------------------------------------------------------

def test_a_step_folder_without_state_json_is_ignored_cleaned_and_does_not_block_the_next_write(tmp_path):
    checkpoint(tmp_path, 4)
    (tmp_path / "step_000006").mkdir()
    (tmp_path / "step_000006" / "adapter.safetensors").write_bytes(b"cut")
    assert latest_checkpoint(tmp_path).name == "step_000004"
    assert checkpoint(tmp_path, 6).name == "step_000006"
    assert load_checkpoint(tmp_path / "step_000006").step == 6


def test_resuming_an_earlier_step_of_a_run_with_later_ones_branches_into_a_new_folder(tmp_path):
    run = tmp_path / "run_00001"
    for step in (4, 8):
        checkpoint(run, step)
    plan = plan_run_folders(tmp_path, run / "step_000004", "")
    assert plan.branched and plan.resume == run / "step_000004"
    assert plan.run_dir == tmp_path / "run_00001_from_step_000004_00001" and not plan.run_dir.exists()
    latest = plan_run_folders(tmp_path, run, "")
    assert not latest.branched and latest.resume == run / "step_000008" and latest.run_dir == run
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        plan_run_folders(tmp_path, tmp_path / "empty", "") if (tmp_path / "empty").mkdir() is None else None


def test_a_truncated_checkpoint_file_names_the_file_and_the_earlier_checkpoint(tmp_path):
    checkpoint(tmp_path, 2)
    bad = checkpoint(tmp_path, 3)
    data = (bad / "adapter.safetensors").read_bytes()
    os.chmod(bad / "adapter.safetensors", 0o644)
    (bad / "adapter.safetensors").write_bytes(data[:20])
    with pytest.raises(CheckpointError, match=r"step_000003 is damaged: adapter.safetensors cannot be read.*"
                                              r"earlier one instead \(.*step_000002\)"):
        load_checkpoint(bad)


def test_files_and_checkpoint_folders_get_ordinary_modes(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_safetensors_new(tmp_path / "a.safetensors", {"w": torch.ones(2)})
        folder = checkpoint(tmp_path / "run", 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


def test_a_dangling_symlink_at_the_next_free_name_is_skipped_not_written_through(tmp_path):
    outside = tmp_path / "outside" / "target.safetensors"
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "x_00001.safetensors").symlink_to(outside)
    path = save_safetensors_new(next_free_path(tmp_path / "loras", "x", ".safetensors"), {"w": torch.ones(1)})
    assert path.name == "x_00002.safetensors" and not outside.exists()


# --- the loop: a cancel raised from inside the forward ----------------------------------------------

class Cancelled(BaseException):
    """Stands for ComfyUI's InterruptProcessingException (the node tests use the real one)."""


def test_a_cancel_raised_inside_the_forward_returns_after_the_last_finished_step():
    config = TrainConfig(steps=6, learning_rate=1e-3, seed=2, precision=Precision.FP32)

    def run(cancel_at=None):
        model = tiny_unet_model()
        adapter = attach_adapter(model.unet, model.adaptable_modules(TargetPreset.ATTENTION_MLP),
                                 AdapterConfig(rank=2, alpha=2), seed=0)
        calls = {"n": 0}
        real = model.predict

        def predict(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == cancel_at:
                raise Cancelled()
            return real(*args, **kwargs)
        model.predict = predict
        state, _, _ = train(model, adapter, BatchSchedule(tiny_samples(), 2, seed=2), config,
                            callbacks=Callbacks(is_cancel=lambda e: isinstance(e, Cancelled)))
        return state, adapter.state_dict()

    state, cut = run(cancel_at=4)
    assert state.step == 3 and len(state.losses) == 3
    three = TrainConfig(**{**config.__dict__, "steps": 3})
    model = tiny_unet_model()
    adapter = attach_adapter(model.unet, model.adaptable_modules(TargetPreset.ATTENTION_MLP),
                             AdapterConfig(rank=2, alpha=2), seed=0)
    train(model, adapter, BatchSchedule(tiny_samples(), 2, seed=2), three)
    assert all(torch.equal(cut[k], v) for k, v in adapter.state_dict().items())
    with pytest.raises(ZeroDivisionError):  # anything else still propagates
        train(tiny_unet_model(), adapter, BatchSchedule(tiny_samples(), 2, seed=2), config,
              callbacks=Callbacks(on_step=lambda *a: 1 / 0, is_cancel=lambda e: isinstance(e, Cancelled)))


# --- datasets ---------------------------------------------------------------------------------------

def test_a_fifo_and_a_socket_in_a_dataset_are_skipped_and_listed_not_opened(tmp_path):
    import socket
    Image.new("RGB", (64, 64)).save(tmp_path / "fine.png")
    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "fine.txt")  # a caption that is a FIFO would block too
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.jpg"))
    try:
        with pytest.warns(UserWarning):
            dataset = scan_folder(tmp_path, DatasetConfig(captions=CaptionConfig(trigger="tok")))
    finally:
        sock.close()
    reasons = skipped_reasons(dataset)
    assert [i.path.name for i in dataset.items] == ["fine.png"]
    assert "a FIFO" in reasons["pipe.png"] and "a FIFO" in reasons["fine.txt"] and "a socket" in reasons["sock.jpg"]


def _write_blank_png(path: Path, width: int, height: int) -> None:
    """A valid RGB PNG of the given size, streamed row by row (this test's own memory stays small)."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    comp, row = zlib.compressobj(9), b"\0" * (1 + 3 * width)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\0\0\0"))
        data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
        f.write(chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_a_108_megapixel_png_is_refused_from_its_header_with_no_decode_checked_by_memory(tmp_path):
    _write_blank_png(tmp_path / "huge.png", 12000, 9000)
    Image.new("RGB", (64, 64)).save(tmp_path / "fine.png")
    script = PACK_IMPORT_SNIPPET + textwrap.dedent(f"""
        import resource, warnings
        from comfyui_dojo.training.datasets import DatasetConfig, scan_folder
        from comfyui_dojo.training.datasets.captions import CaptionConfig
        warnings.simplefilter("ignore")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        d = scan_folder({str(tmp_path)!r}, DatasetConfig(captions=CaptionConfig(trigger="t")))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(dict((p.name, r) for p, r in d.skipped)["huge.png"])
        print("grew_kb", after - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    reason, grew = out.stdout.strip().splitlines()
    assert "too large to decode safely (12000x9000 = 108 MP" in reason
    assert int(grew.split()[1]) < 40_000, grew  # a decode would take ~324 MB (RGB) or more


def test_images_with_no_caption_and_no_trigger_warn_in_the_scan(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a red square")
    with pytest.warns(UserWarning, match="1 of 2 items have a caption"):
        dataset = scan_folder(tmp_path, DatasetConfig())
    assert any("no trigger word is set" in w for w in dataset.warnings)
    (tmp_path / "b.txt").unlink()
    assert any("no item has a caption" in w for w in scan_folder(tmp_path, DatasetConfig()).warnings)
    import warnings as w
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        scan_folder(tmp_path, DatasetConfig(captions=CaptionConfig(trigger="sks")))
    assert not any("no trigger word" in str(c.message) for c in caught)


def test_write_captions_with_overwrite_keeps_the_old_file_as_bak_and_never_overwrites_a_backup(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first words")
    for new_text in ("second words", "third words"):
        dataset = with_raw_captions(scan_folder(tmp_path, DatasetConfig()), [new_text])
        report = write_captions(dataset, overwrite=True)
        assert report.written == [tmp_path / "a.txt"]
    assert (tmp_path / "a.txt").read_text().strip() == "third words"
    assert (tmp_path / "a.txt.bak").read_text() == "first words"
    assert (tmp_path / "a.txt.00001.bak").read_text().strip() == "second words"


# --- publishing needs the owner's opt-in -------------------------------------------------------------

def test_publishing_is_off_unless_the_owner_opts_in(tmp_path):
    assert not publish_allowed(tmp_path, environ={})
    assert publish_allowed(tmp_path, environ={"DOJO_ALLOW_PUBLISH": "1"})
    assert not publish_allowed(tmp_path, environ={"DOJO_ALLOW_PUBLISH": "0"})
    (tmp_path / "comfyui-dojo.json").write_text(json.dumps({"allow_publish": "yes"}))  # only true counts
    assert not publish_allowed(tmp_path, environ={})
    (tmp_path / "comfyui-dojo.json").write_text(json.dumps({"allow_publish": True}))
    assert publish_allowed(tmp_path, environ={})
    (tmp_path / "default").mkdir()  # a per-user folder (what ComfyUI's userdata API writes) does not count
    (tmp_path / "comfyui-dojo.json").unlink()
    (tmp_path / "default" / "comfyui-dojo.json").write_text(json.dumps({"allow_publish": True}))
    assert not publish_allowed(tmp_path, environ={})


TRAINER = PACK_IMPORT_SNIPPET + textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    import safetensors.torch
    from helpers import tiny_samples, tiny_unet_model
    from comfyui_dojo.training.adapters import AdapterConfig, attach_adapter
    from comfyui_dojo.training.batches import BatchSchedule
    from comfyui_dojo.training.checkpoints import RunCheckpoints, latest_checkpoint
    from comfyui_dojo.training.loop import Callbacks, Precision, TrainConfig, TrainState, train
    from comfyui_dojo.training.protocol import TargetPreset
    run = Path(sys.argv[1])
    config = TrainConfig(steps=30, learning_rate=1e-3, seed=5, precision=Precision.FP32)
    model = tiny_unet_model()
    adapter = attach_adapter(model.unet, model.adaptable_modules(TargetPreset.ATTENTION_MLP),
                             AdapterConfig(rank=4, alpha=4), seed=0)
    checkpoints = RunCheckpoints(run, {"seed": 5, "steps": 30}, adapter)
    state, optimizer_state = TrainState(), None
    latest = latest_checkpoint(run)
    if latest is not None:
        step, losses, optimizer_state = checkpoints.resume(latest)
        state = TrainState(step, losses)
    print("ready", state.step, flush=True)
    state, optimizer, scheduler = train(model, adapter, BatchSchedule(tiny_samples(), 2, seed=5), config, state=state,
                                        optimizer_state=optimizer_state,
                                        callbacks=Callbacks(on_checkpoint=checkpoints.write), checkpoint_every=1)
    safetensors.torch.save_file(adapter.state_dict(), str(run.parent / "final.safetensors"))
    print("done", flush=True)
""")


def last_step(run: Path) -> int:
    folder = latest_checkpoint(run)
    return checkpoint_step(folder) if folder is not None else 0


def test_a_training_process_killed_with_sigkill_again_and_again_resumes_to_the_same_bits(tmp_path):
    run, rng = tmp_path / "run", random.Random(21)
    engine_dir = str(Path(__file__).parent)
    kills = 0
    while not (tmp_path / "final.safetensors").exists():
        assert kills < 12, "never finished"
        proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(run), engine_dir], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdout.readline().startswith("ready")
        if kills < 3:
            # Kill after 1-3 more checkpoints plus a random 0-50 ms, so the kills land inside this run on
            # any machine speed: at whatever moment of a step or of a checkpoint write.
            target = last_step(run) + rng.randint(1, 3)
            while proc.poll() is None and last_step(run) < target:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.05))
        if kills < 3 and proc.poll() is None:
            proc.kill()  # SIGKILL
            proc.wait()
            kills += 1
        else:
            proc.wait(timeout=300)
        assert all((p / "state.json").is_file() for p in run.glob("step_*")), listing(run)
    assert kills >= 3
    model = tiny_unet_model()
    adapter = attach_adapter(model.unet, model.adaptable_modules(TargetPreset.ATTENTION_MLP),
                             AdapterConfig(rank=4, alpha=4), seed=0)
    train(model, adapter, BatchSchedule(tiny_samples(), 2, seed=5),
          TrainConfig(steps=30, learning_rate=1e-3, seed=5, precision=Precision.FP32))
    final = safetensors.torch.load_file(str(tmp_path / "final.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in adapter.state_dict().items())
    assert not [n for n in listing(run) if n.startswith(".")]  # the killed writers' temporaries were cleaned
