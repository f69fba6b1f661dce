"""`python -m comfyui_dojo.headless`: the bundled workflows' training without the UI writes what queueing them in
ComfyUI writes, bit for bit; `--nproc 2` (gloo) trains what one process trains with the same global batch;
bad input and a killed rank end with a clear message, every rank gone and the last checkpoint kept."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from comfy_harness import comfyui_path
from pack_import import PACK_IMPORT_SNIPPET
from test_workflows import load, stand_ins, to_test_prompt  # noqa: F401  (stand_ins is a fixture)

pytestmark = pytest.mark.integration

# What `python -m comfyui_dojo.headless` runs, with `comfyui_dojo` meaning this checkout.
RUN_MODULE = PACK_IMPORT_SNIPPET + "import runpy; runpy.run_module('comfyui_dojo.headless', run_name='__main__')\n"
HV = "dojo_hunyuan_video_lora_images"


def headless_command(comfy, workflow, *args) -> list[str]:
    return [sys.executable, "-c", RUN_MODULE, str(workflow), "--comfyui", str(comfyui_path()),
            "--base-directory", str(comfy.base), "--cpu", "--timeout", "120", *args]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def headless(comfy, workflow, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(headless_command(comfy, workflow, *args), capture_output=True, text=True, timeout=timeout,
                          env=env(), cwd="/")


def saved(out: str) -> list[str]:
    return re.findall(r"\] saved (\S+)", out)


def read(path: Path) -> tuple[dict, dict]:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# Keys that say when a file was written (kohya's training start, ModelSpec's date): two runs differ there.
WRITTEN_AT = ("ss_training_started_at", "modelspec.date")
# Keys that hold the file's own name (the two files of a comparison never share one: nothing is overwritten).
FILE_NAME = ("ss_output_name", "modelspec.title", "modelspec.trigger_phrase")


def comparable(metadata: dict, path: Path) -> dict:
    """A file's metadata without the time it was written and with its own name as <name>; everything else
    (the embedded graph included) must be equal."""
    return {k: (v.replace(path.stem, "<name>") if k in FILE_NAME else v)
            for k, v in metadata.items() if k not in WRITTEN_AT}


def api_file(tmp_path, prompt, name="prompt.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(prompt))
    return path


def lora_path(comfy, name) -> Path:
    return comfy.base / "models" / "loras" / name


# ----------------------------------------------------------------- headless = the UI, bit for bit

TI_SETTINGS = ["DojoLoadImageDataset.resolution=64", "DojoLoadImageDataset.min_side=64",
               "DojoLoadImageDataset.max_side=64", "DojoTrainTextualInversion.steps=2",
               "DojoTrainTextualInversion.precision=fp32", "DojoTrainTextualInversion.checkpoint_every=0",
               "KSampler.steps=2", "EmptyLatentImage.width=64", "EmptyLatentImage.height=64"]


def test_sd15_textual_inversion_workflow_file_headless_equals_the_ui(comfy, stand_ins):
    """The bundled UI-format file itself, converted by the runner, widgets overridden with --set."""
    name = "dojo_sd15_textual_inversion"
    wf = load(name)
    ui = comfy.run(to_test_prompt(comfy, wf), extra_pnginfo={"workflow": wf})
    assert ui.success, ui.error_message()
    ui_name = ui.ui_outputs[next(i for i, n in to_test_prompt(comfy, wf).items()
                                 if n["class_type"] == "DojoSaveEmbedding")]["text"][0]

    run = headless(comfy, Path(__file__).resolve().parents[2] / "workflows" / f"{name}.json",
                   *[a for s in TI_SETTINGS for a in ("--set", s)])
    assert run.returncode == 0, run.stderr
    assert "running #" in run.stdout and re.search(r"step 2/2 +loss", run.stdout)
    ran = re.findall(r"^running #\d+ (\S+)", run.stdout, re.M)
    assert "DojoTrainTextualInversion" in ran and "DojoSaveEmbedding" in ran
    assert not {"KSampler", "VAEDecode", "SaveImage"} & set(ran), "sampling ran; only the training part should"
    [headless_name] = saved(run.stdout)
    assert headless_name != ui_name  # a second file: never overwritten
    folder = comfy.base / "models" / "embeddings"
    ui_path = folder / (ui_name.split(":", 1)[1] + ".safetensors")
    hl_path = folder / (headless_name.split(":", 1)[1] + ".safetensors")
    (ui_tensors, ui_meta), (hl_tensors, hl_meta) = read(ui_path), read(hl_path)
    assert ui_tensors.keys() == hl_tensors.keys() == {"emb_params"}
    assert all(torch.equal(ui_tensors[k], hl_tensors[k]) for k in ui_tensors)
    # the embedded graph too: the runner passes the workflow as the UI does
    assert comparable(hl_meta, hl_path) == comparable(ui_meta, ui_path)


@pytest.mark.parametrize("name", [HV, "dojo_hunyuan_video_lora_clips"])
def test_hunyuan_video_workflow_headless_equals_the_ui(comfy, stand_ins, tmp_path, name):
    """The API format (what Export (API) saves), with the tests' stand-in text encoder."""
    prompt = to_test_prompt(comfy, load(name))
    ui = comfy.run(prompt)
    assert ui.success, ui.error_message()
    saver = next(i for i, n in prompt.items() if n["class_type"] == "DojoSaveLoRA")
    ui_name = ui.ui_outputs[saver]["text"][0]

    run = headless(comfy, api_file(tmp_path, prompt))
    assert run.returncode == 0, run.stderr
    ran = re.findall(r"^running #\d+ (\S+)", run.stdout, re.M)
    assert "DojoTrainLoRA" in ran and "DojoSaveLoRA" in ran and "SaveWEBM" not in ran
    assert "ETA" in run.stdout
    [headless_name] = saved(run.stdout)
    ui_path, hl_path = lora_path(comfy, ui_name), lora_path(comfy, headless_name)
    (ui_tensors, ui_meta), (hl_tensors, hl_meta) = read(ui_path), read(hl_path)
    assert len(ui_tensors) > 0 and ui_tensors.keys() == hl_tensors.keys()
    assert all(torch.equal(ui_tensors[k], hl_tensors[k]) for k in ui_tensors)
    assert comparable(hl_meta, hl_path) == comparable(ui_meta, ui_path)


# ------------------------------------------------------------------------------- data parallel

def ddp_prompt(comfy, steps, **train):
    prompt = to_test_prompt(comfy, load(HV))
    for node in prompt.values():
        if node["class_type"] == "DojoTrainLoRA":
            node["inputs"].update(steps=steps, batch_size=2, **train)
        if node["class_type"] == "DojoSaveLoRA":
            node["inputs"]["save_dtype"] = "fp32"
    return prompt


def delta_weights(tensors: dict) -> dict:
    """Per module: the weight change up @ down (the LoRA's effect, independent of how it factors)."""
    return {k[:-len(".lora_A.weight")]: tensors[k[:-len("A.weight")] + "B.weight"].double() @ tensors[k].double()
            for k in tensors if k.endswith(".lora_A.weight")}


def relative_difference(a: dict, b: dict) -> float:
    da, db = delta_weights(a), delta_weights(b)
    assert da.keys() == db.keys() and da
    return max(((da[k] - db[k]).norm() / da[k].norm()).item() for k in da)


# fp32 training. Not bit-identical: each rank computes the mean loss of its share and gloo sums the shares'
# gradients, where one process reduces the whole batch itself: the same numbers are added in another order, and
# the forward runs on batches of 1 instead of 2 (other matmul blocking), so gradients differ in their last bits
# (~1e-7 relative). AdamW then amplifies that: its update is ~ lr * grad / |grad| per element, so elements whose
# gradient is near zero move by a different amount (up to 2 lr). Measured on the tiny HunyuanVideo after
# 4 steps (relative change of up @ down per module, worst module): 8.7e-5 (seed 42) and 1.1e-4 (seed 7).
# The tolerance 1e-3 leaves ~10x margin; one step more or less changes the LoRA by ~20% (checked below).
DDP_TOLERANCE = 1e-3


def test_two_ranks_train_what_one_trains_and_resume_across_rank_counts(comfy, stand_ins, tmp_path):
    one = headless(comfy, api_file(tmp_path, ddp_prompt(comfy, 4, run_name="ddp_one")), "--nproc", "1")
    assert one.returncode == 0, one.stderr
    two = headless(comfy, api_file(tmp_path, ddp_prompt(comfy, 4, run_name="ddp_two", checkpoint_every=2), "two.json"),
                   "--nproc", "2")
    assert two.returncode == 0, two.stderr
    assert "[launcher] rank 1: pid" in two.stdout
    [one_name], [two_name] = saved(one.stdout), saved(two.stdout)
    single, _ = read(lora_path(comfy, one_name))
    double, meta = read(lora_path(comfy, two_name))
    print(f"--nproc 2 vs --nproc 1, global batch 2, 4 steps: {relative_difference(single, double):.3g}")
    assert relative_difference(single, double) < DDP_TOLERANCE
    assert json.loads(meta["dojo_training"])["batch_size"] == 2

    # Two ranks wrote one set of checkpoints (rank 0 only); one rank resumes at step 2 and matches both.
    runs = sorted((comfy.base / "output" / "dojo_checkpoints").glob("ddp_two*"))
    # only rank 0 writes: its checkpoints, and the workflow's preview samples
    assert [p.name for p in sorted(runs[-1].iterdir()) if p.name != "samples"] == ["step_000002", "step_000004"]
    # (a run folder of its own: resuming in place would reach step 4, whose checkpoint exists and is never overwritten)
    fresh = runs[-1].parent / f"ddp_resume_{tmp_path.name}"
    shutil.copytree(runs[-1] / "step_000002", fresh / "step_000002")
    resume = ddp_prompt(comfy, 4, resume_from=f"{fresh.name}/step_000002")
    again = headless(comfy, api_file(tmp_path, resume, "resume.json"))
    assert again.returncode == 0, again.stderr
    resumed, _ = read(lora_path(comfy, saved(again.stdout)[0]))
    assert relative_difference(single, resumed) < DDP_TOLERANCE
    assert relative_difference(double, resumed) < DDP_TOLERANCE
    # ... while one step more is far outside the tolerance: the comparison can fail.
    longer = headless(comfy, api_file(tmp_path, ddp_prompt(comfy, 5, run_name="ddp_five"), "five.json"))
    assert longer.returncode == 0, longer.stderr
    assert relative_difference(single, read(lora_path(comfy, saved(longer.stdout)[0]))[0]) > 100 * DDP_TOLERANCE


# ------------------------------------------------------------------------------------ bad input

def test_a_workflow_without_a_training_node(comfy, stand_ins, tmp_path):
    prompt = {"1": comfy.node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")}
    run = headless(comfy, api_file(tmp_path, prompt))
    assert run.returncode == 2
    assert "no Dojo training node" in run.stderr and "Dojo Train LoRA" in run.stderr


def test_a_missing_model_file_and_a_missing_dataset_folder(comfy, stand_ins, tmp_path):
    prompt = to_test_prompt(comfy, load(HV))
    unet = next(i for i, n in prompt.items() if n["class_type"] == "UNETLoader")
    data = next(i for i, n in prompt.items() if n["class_type"] == "DojoLoadImageDataset")
    prompt[unet]["inputs"]["unet_name"] = "not_downloaded.safetensors"
    prompt[data]["inputs"]["folder"] = "no_such_folder"
    run = headless(comfy, api_file(tmp_path, prompt))
    assert run.returncode == 2, run.stderr
    assert f"#{unet} UNETLoader" in run.stderr and "not_downloaded.safetensors" in run.stderr
    assert "diffusion_models" in run.stderr  # where to put it
    assert f"#{data} DojoLoadImageDataset" in run.stderr and "no_such_folder" in run.stderr
    assert "input directory" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_override_that_does_not_fit(comfy, stand_ins, tmp_path):
    path = api_file(tmp_path, to_test_prompt(comfy, load(HV)))
    run = headless(comfy, path, "--set", "DojoTrainLoRA.stepz=3")
    assert run.returncode == 2 and "'stepz' is not an input" in run.stderr and "steps" in run.stderr
    run = headless(comfy, path, "--set", "DojoTrainLoRA.precision=fp8")
    assert run.returncode == 2 and "not one of the options" in run.stderr


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def run_folder(comfy, run_name) -> Path | None:
    """The checkpoint folder Train LoRA made for `run_name` (it numbers run folders: <run_name>_00001)."""
    found = sorted((comfy.base / "output" / "dojo_checkpoints").glob(f"{run_name}_*"))
    return found[-1] if found else None


def complete_steps(run_dir: Path | None) -> list[int]:
    if run_dir is None:
        return []
    return sorted(int(p.name[5:]) for p in run_dir.glob("step_*") if (p / "state.json").is_file())


def start(comfy, tmp_path, prompt, *args):
    out, err = open(tmp_path / "out.txt", "w"), open(tmp_path / "err.txt", "w")
    proc = subprocess.Popen(headless_command(comfy, api_file(tmp_path, prompt), *args), stdout=out, stderr=err,
                            env=env(), cwd="/", start_new_session=True)
    return proc, lambda: (tmp_path / "out.txt").read_text(), lambda: (tmp_path / "err.txt").read_text()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" if Path(f"/proc/{pid}").exists() else False


STEPS = 100  # ~0.3-0.5 s each here: long enough to be stopped half-way


def test_a_rank_killed_mid_run(comfy, stand_ins, tmp_path):
    """kill -9 of rank 1: rank 0's next all-reduce fails at once, it says which checkpoint is kept, the
    launcher stops and reports; nothing waits for the collective timeout, no process is left."""
    run_name = f"killed_{tmp_path.name}"
    prompt = ddp_prompt(comfy, STEPS, run_name=run_name, checkpoint_every=2)
    proc, out, err = start(comfy, tmp_path, prompt, "--nproc", "2")
    try:
        wait_for(lambda: len(complete_steps(run_folder(comfy, run_name))) >= 2, 300, "two checkpoints")
        pids = [int(p) for p in re.findall(r"rank \d: pid (\d+)", out())]
        assert len(pids) == 2
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.time() - killed_at < 40, "a rank waited for the collective timeout"
    assert proc.returncode != 0
    assert "rank 1 was killed by signal 9" in err()
    assert "another training process stopped" in err() and "is kept" in err(), err()
    run_dir = run_folder(comfy, run_name)
    kept = complete_steps(run_dir)
    assert kept and kept[-1] < STEPS
    assert not any(alive(p) for p in pids)
    # The kept checkpoint resumes in one process.
    resume = ddp_prompt(comfy, kept[-1] + 1, resume_from=f"{run_dir.name}/step_{kept[-1]:06d}")
    again = headless(comfy, api_file(tmp_path, resume, "resume.json"))
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_is_cancel_and_keeps_the_checkpoint(comfy, stand_ins, tmp_path, nproc):
    """A real SIGINT, as a terminal sends it: one process runs ComfyUI's interrupt_current_processing();
    two ranks agree on the step to stop after, and rank 0 checkpoints it."""
    run_name = f"ctrl_c_{nproc}_{tmp_path.name}"
    prompt = ddp_prompt(comfy, STEPS, run_name=run_name, checkpoint_every=3)
    proc, out, err = start(comfy, tmp_path, prompt, "--nproc", str(nproc))
    try:
        wait_for(lambda: complete_steps(run_folder(comfy, run_name)), 300, "a checkpoint")
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err()
    assert "cancelled" in err()
    kept = complete_steps(run_folder(comfy, run_name))
    assert kept and kept[-1] < STEPS
    if nproc == 2:  # stopped after an agreed step, which rank 0 checkpointed (not a multiple of 3 by chance only)
        assert "training cancelled at step" in err()
        step = int(re.search(r"training cancelled at step (\d+)", err()).group(1))
        assert kept[-1] == step
