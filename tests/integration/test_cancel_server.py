"""The queue's Cancel button on a real ComfyUI server (main.py --cpu --listen 127.0.0.1): POST /prompt, then
POST /interrupt while Dojo Train LoRA runs. The prompt ends interrupted, the last finished step is kept as a
checkpoint, the log names the exact resume_from, and resuming gives the same file bit for bit as a run that
was never interrupted."""
import json
import time
import urllib.request
import uuid

import pytest
import safetensors.torch

import tiny_files
from comfy_harness import comfyui_server, make_base_directory
from test_dataset_nodes import image

pytestmark = pytest.mark.integration


def post(server, path, body=None):
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        text = r.read()
    return json.loads(text) if text else None


def get(server, path):
    with urllib.request.urlopen(server.url + path, timeout=30) as r:
        return json.load(r)


def wait_for(condition, timeout_s, what, server):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{server.log()[-4000:]}")


def history(server, prompt_id):
    return get(server, f"/history/{prompt_id}").get(prompt_id)


def graph(comfy, ckpt, **train):
    n = comfy.node
    return {
        "ckpt": n("CheckpointLoaderSimple", ckpt_name=ckpt),
        "data": n("DojoLoadImageDataset", folder="srv_set", trigger_word="srvtok", resolution=64, min_side=64,
                  max_side=64),
        "enc": n("DojoEncodeDataset", dataset=["data", 0], vae=["ckpt", 2], clip=["ckpt", 1]),
        "train": n("DojoTrainLoRA", model=["ckpt", 0], dataset=["enc", 0], steps=40, batch_size=1, rank=4,
                   precision="fp32", learning_rate=1e-3, gradient_checkpointing="off", seed=7, **train),
        "save": n("DojoSaveLoRA", lora=["train", 0], filename_prefix=f"srv/{train.get('run_name', 'resumed')}",
                  save_dtype="fp32"),
    }


def queue(server, prompt):
    return post(server, "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]


def test_post_interrupt_on_a_real_server_keeps_a_checkpoint_and_resume_is_bit_identical(comfy, tmp_path):
    base = make_base_directory(tmp_path / "server_base")
    ckpt = tiny_files.provide_sd15_checkpoint(base)
    for i, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        image(base / "input" / "srv_set" / f"img{i}.png", (64, 64), colour, "a square")
    with comfyui_server(base, tmp_path / "server.log", "/object_info") as (server, _):
        cut = queue(server, graph(comfy, ckpt, run_name="srv_cut"))
        wait_for(lambda: "Dojo: step 1/40" in server.log(), 300, "training to start", server)
        post(server, "/interrupt")
        done = wait_for(lambda: history(server, cut), 300, "the interrupted prompt to end", server)
        events = [m[0] for m in done["status"]["messages"]]
        assert "execution_interrupted" in events and "execution_success" not in events, events
        run = base / "output" / "dojo_checkpoints" / "srv_cut_00001"
        kept = sorted(p.name for p in run.iterdir())
        assert len(kept) == 1 and (run / kept[0] / "state.json").is_file(), kept
        step = int(kept[0][len("step_"):])
        assert 1 <= step < 40
        assert f"training cancelled at step {step} of 40" in server.log()
        assert "set resume_from to 'srv_cut_00001'" in server.log()

        resumed = queue(server, graph(comfy, ckpt, run_name="ignored", resume_from="srv_cut_00001"))
        straight = queue(server, graph(comfy, ckpt, run_name="srv_straight"))
        for pid in (resumed, straight):
            entry = wait_for(lambda: history(server, pid), 600, "a training prompt to finish", server)
            assert entry["status"]["status_str"] == "success", entry["status"]
        saved = {name: safetensors.torch.load_file(str(base / "models" / "loras" / "srv" / f"{name}_00001.safetensors"))
                 for name in ("ignored", "srv_straight")}
    a, b = saved["ignored"], saved["srv_straight"]
    assert set(a) == set(b) and a and all(a[k].equal(b[k]) for k in a)
