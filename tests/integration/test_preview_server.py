"""Live training previews through a real ComfyUI server (main.py on 127.0.0.1): a Train LoRA prompt with
previews sends them over the websocket while it trains (the node's preview image, and the saved sample
files as the node's output), writes samples/step_NNNNNN.png at the expected steps, and saves the same
LoRA file, bit for bit, as the same prompt with previews off."""
import base64
import io
import json
import os
import socket
import struct
import time
import urllib.parse
import urllib.request
import uuid

import numpy as np
import pytest
import safetensors.torch
from PIL import Image

from comfy_harness import comfyui_server, make_base_directory
from test_dataset_nodes import image

pytestmark = pytest.mark.integration


class WebSocket:
    """The smallest websocket client that reads ComfyUI's /ws (RFC 6455, no extensions): the stdlib only,
    so the pack gains no dependency for a test."""

    def __init__(self, url: str):
        host, port = url.split("//")[1].split("/")[0].split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=600)
        key = base64.b64encode(os.urandom(16)).decode()
        path = "/" + url.split("//")[1].split("/", 1)[1]
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("websocket closed")
            data += chunk
        return data

    def receive(self):
        """(opcode, payload) of the next whole message (1 = text, 2 = binary)."""
        opcode, payload = None, b""
        while True:
            b0, b1 = self._read(2)
            length = b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            data = self._read(length)
            if mask:
                data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
            if b0 & 0x0F == 9:  # ping: answer with a (masked, as clients must) pong
                self.sock.sendall(bytes([0x8A, 0x80 | len(data)]) + b"\0\0\0\0" + data)
                continue
            opcode = opcode or (b0 & 0x0F)
            payload += data
            if b0 & 0x80:
                return opcode, payload

    def close(self):
        self.sock.close()


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def run_prompt(server, ws, client_id, prompt):
    """Queue `prompt` and collect its messages until it ends: [(kind, data)] with kind "json" or "preview"."""
    prompt_id = post(server.url + "/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
    messages, deadline = [], time.time() + 900
    while time.time() < deadline:
        opcode, payload = ws.receive()
        if opcode == 2:
            event, image_type = struct.unpack(">II", payload[:8])
            if event == 1:  # PREVIEW_IMAGE: the node's live preview
                messages.append(("preview", Image.open(io.BytesIO(payload[8:])).convert("RGB")))
            continue
        message = json.loads(payload)
        data = message.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        messages.append(("json", message))
        if message["type"] == "execution_error":
            raise AssertionError(f"{data.get('exception_type')}: {data.get('exception_message')}")
        if message["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return messages
    raise AssertionError("the prompt did not finish")


def loss_graph(server, messages) -> Image.Image:
    """The image in the train node's final UI output, fetched from the server as the frontend does."""
    final = [m for kind, m in messages if kind == "json" and m["type"] == "executed" and m["data"]["node"] == "train"]
    entry = final[-1]["data"]["output"]["images"][0]
    query = urllib.parse.urlencode(entry)
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as r:
        return Image.open(io.BytesIO(r.read())).convert("RGB")


def test_live_previews_over_the_websocket_and_the_same_lora_without_them(comfy, tmp_path, tiny_sd15_checkpoint):
    import tiny_files
    base = make_base_directory(tmp_path / "server_base")
    source = next(p for p in (comfy.base / "models").rglob(tiny_sd15_checkpoint) if p.is_file())
    tiny_files.link_into(base, "checkpoints", tiny_sd15_checkpoint, source.resolve())
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        image(base / "input" / "preview_set" / f"img{i}.png", (64, 64), colour, "a plain square, [trigger]")
    n = comfy.node
    graph = {
        "ckpt": n("CheckpointLoaderSimple", ckpt_name=tiny_sd15_checkpoint),
        "data": n("DojoLoadImageDataset", folder="preview_set", trigger_word="DeltamonStamp", resolution=64,
                  min_side=64, max_side=64),
        "enc": n("DojoEncodeDataset", dataset=["data", 0], vae=["ckpt", 2], clip=["ckpt", 1], cache_to_disk=False),
        "pos": n("CLIPTextEncode", clip=["ckpt", 1], text="DeltamonStamp, a plain square"),
        "neg": n("CLIPTextEncode", clip=["ckpt", 1], text="blurry"),
    }
    train = dict(model=["ckpt", 0], dataset=["enc", 0], steps=5, batch_size=2, rank=4, precision="fp32",
                 seed=3, learning_rate=1e-3)

    def prompt(run_name, previews: bool):
        p = dict(graph)
        extra = {} if not previews else dict(
            preview_positive=["pos", 0], preview_negative=["neg", 0], preview_vae=["ckpt", 2], sample_every=2,
            sample_steps=2, sample_width=64, sample_height=64, sample_seed=7)
        p["train"] = n("DojoTrainLoRA", run_name=run_name, **train, **extra)
        p["save"] = n("DojoSaveLoRA", lora=["train", 0], filename_prefix=f"previews/{run_name}")
        return p

    client_id = uuid.uuid4().hex
    with comfyui_server(base, tmp_path / "server.log") as (server, _):
        ws = WebSocket(f"{server.url.replace('http', 'ws')}/ws?clientId={client_id}")
        try:
            with_previews = run_prompt(server, ws, client_id, prompt("live", previews=True))
            without = run_prompt(server, ws, client_id, prompt("quiet", previews=False))
            graphs = [loss_graph(server, messages) for messages in (with_previews, without)]
        finally:
            ws.close()
    # The loss graph output: the curve (640 x 320), with the run's samples as a labelled strip underneath.
    assert graphs[1].size == (640, 320)
    assert graphs[0].width == 640 and graphs[0].height > 320 + 64

    samples = base / "output" / "dojo_checkpoints" / "live_00001" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [f"step_{s:06d}.png" for s in (0, 2, 4, 5)]
    assert not (base / "output" / "dojo_checkpoints" / "quiet_00001" / "samples").exists()

    # Each sample was shown on the node while it trained: as the node's preview image (the sample above the
    # loss curve) and as the node's output, before the node finished.
    previews = [m for kind, m in with_previews if kind == "preview"]
    for step in (0, 2, 4, 5):
        pixels = np.asarray(Image.open(samples / f"step_{step:06d}.png").convert("RGB"))
        assert any(p.size[0] >= 64 and np.array_equal(np.asarray(p)[:64, :64], pixels) for p in previews), step
    order = [m for kind, m in with_previews if kind == "json"]
    shown = [k for k, m in enumerate(order) if m["type"] == "executed" and m["data"]["node"] == "train"
             and m["data"]["output"]["images"][0]["filename"].startswith("step_")]
    assert [order[k]["data"]["output"]["images"][0]["filename"] for k in shown] == \
        [f"step_{s:06d}.png" for s in (0, 2, 4, 5)]
    assert order[shown[0]]["data"]["output"]["images"][0] == {
        "filename": "step_000000.png", "subfolder": "dojo_checkpoints/live_00001/samples", "type": "output"}
    progress_after = [m["data"]["value"] for m in order[shown[1]:] if m["type"] == "progress"
                      and m["data"].get("node") == "train"]
    assert progress_after and max(progress_after) >= 3, "the step-2 preview came only after training"
    final = [m for m in order if m["type"] == "executed" and m["data"]["node"] == "train"][-1]
    assert final["data"]["output"]["images"][0]["type"] == "temp"  # the loss graph + sample strip

    # The LoRA files are the same bits with and without previews.
    loras = base / "models" / "loras" / "previews"
    a = safetensors.torch.load_file(str(loras / "live_00001.safetensors"))
    b = safetensors.torch.load_file(str(loras / "quiet_00001.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)
