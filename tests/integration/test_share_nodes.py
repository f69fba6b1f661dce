"""Adapter Info, Export Model Card and Publish To Hub (against a local mock of the Hub)."""
import importlib
import json
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from comfy_harness import REPO_ROOT
from hub_mock import HubMock
from inprocess_models import tiny_sd15_patcher
from test_lora_nodes import train_node
from test_lora_training import encoded

pytestmark = pytest.mark.integration
FAKE_TOKEN = "hf_" + "T" * 34


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    names = ("nodes.train_lora", "nodes.lora_nodes", "nodes.lora_training", "nodes.share_nodes", "nodes.comfy_compat", "training.protocol", "training.batches",
             "training.encoded", "training.model_card", "training.sharing", "training.hub")
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in names}
    return type("Dojo", (), {k.split(".")[-1]: v for k, v in mods.items()})


@pytest.fixture(scope="module")
def trained(comfy, dojo):
    lora = train_node(dojo, tiny_sd15_patcher(), encoded(dojo), steps=2, batch_size=1, run_name="share").result[0]
    lora.metadata["dojo_trigger_word"] = "zqxstyle"
    saved = dojo.lora_nodes.DojoSaveLoRA.execute(lora, "tests/share", "fp16",
                                                 base_model_name="tiny_sd15.safetensors").result[0]
    return lora, saved


def loras_dir(comfy) -> Path:
    return Path(comfy.folder_paths.get_folder_paths("loras")[0])


def test_info_reports_ours_kohyas_and_files_without_metadata(comfy, dojo, trained):
    info = dojo.share_nodes.DojoAdapterInfo
    ours = info.execute(trained[1]).result[0]
    assert "model family: sd15" in ours and "trigger word: zqxstyle" in ours and "training settings:" in ours
    assert "learning_rate: 0.001" in ours and "network dim (rank): 4" in ours
    root = loras_dir(comfy) / "tests"
    safetensors.torch.save_file({"a": torch.zeros(2)}, str(root / "bare.safetensors"))
    safetensors.torch.save_file({"a": torch.zeros(2)}, str(root / "kohya.safetensors"), metadata={
        "ss_network_dim": "32", "ss_network_alpha": "16", "ss_sd_model_name": "v1-5-pruned.safetensors",
        "ss_steps": "1500", "ss_tag_frequency": json.dumps({"10_cats": {"cat": 10, "blue": 3}})})
    (root / "broken.safetensors").write_bytes(b"\x10\x00garbage")
    torch.save({"a": torch.zeros(1)}, str(root / "old.pt"))
    assert "no metadata" in info.execute("tests/bare.safetensors").result[0]
    kohya = info.execute("tests/kohya.safetensors").result[0]
    assert "network dim (rank): 32" in kohya and "network alpha: 16" in kohya and "v1-5-pruned" in kohya
    assert "steps: 1500" in kohya and "cat (10), blue (3)" in kohya
    assert "cannot be read" in info.execute("tests/broken.safetensors").result[0]
    assert "only .safetensors" in info.execute("tests/old.pt").result[0]
    emb_root = Path(comfy.folder_paths.get_folder_paths("embeddings")[0])
    emb_root.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"emb_params": torch.zeros(2, 768)}, str(emb_root / "share_emb.safetensors"))
    both = info.execute("none", "share_emb.safetensors").result[0]
    assert both.startswith("share_emb.safetensors") and "no metadata" in both


def test_export_folder_card_samples_and_never_overwrites(comfy, dojo, trained):
    export = dojo.share_nodes.DojoExportModelCard.execute
    frames = torch.rand(3, 32, 32, 3)
    first = export("zq style", "openrail++", 0.75, lora=trained[0], samples=frames).result[0]
    second = export("zq style", "openrail++", 0.75, lora_name=trained[1], samples=torch.rand(10, 16, 16, 3),
                    animate_over=8).result[0]
    assert (first, second) == ("zq_style_00001", "zq_style_00002")
    root = Path(comfy.folder_paths.get_output_directory()) / "dojo_exports"
    a, b = root / first, root / second
    assert sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()) == [
        "README.md", "samples/sample_00.png", "samples/sample_01.png", "samples/sample_02.png",
        "zq_style.safetensors"]
    assert (b / "share_00001.safetensors").read_bytes() == (loras_dir(comfy) / trained[1]).read_bytes()
    from PIL import Image
    with Image.open(b / "samples" / "sample.webp") as webp:
        assert webp.n_frames == 10
    card = (a / "README.md").read_text()
    front = dojo.model_card.parse_front_matter(card)
    assert front["instance_prompt"] == "zqxstyle" and front["license"] == "openrail++"
    assert front["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert {"lora", "comfyui", "sd15"} <= set(front["tags"])
    assert "Recommended strength:** 0.75" in card and "load_lora_weights" in card and "LoraLoader" in card
    assert "| rank | 4 |" in card and "| learning_rate | 0.001 |" in card
    assert "![sample](samples/sample_00.png)" in card
    with safetensors.safe_open(str(a / "zq_style.safetensors"), "pt") as f:
        assert f.metadata()["dojo_family"] == "sd15" and set(f.keys()) == set(trained[0])


def test_export_in_a_graph_writes_the_scrubbed_workflow(comfy, dojo, trained):
    n = comfy.node
    prompt = {"load": n("DojoLoadLoRA", lora_name=trained[1]),
              "export": n("DojoExportModelCard", lora=["load", 0], name="graph_export",
                          base_model_repo="me/base")}
    workflow = {"nodes": [{"id": 1, "widgets_values": ["/home/ann/x/y.safetensors"]}], "links": []}
    result = comfy.run(prompt, extra_pnginfo={"workflow": workflow})
    assert result.success, result.error_message()
    folder = Path(comfy.folder_paths.get_output_directory()) / result.ui_outputs["export"]["text"][0]
    assert json.loads((folder / "workflow.json").read_text())["nodes"][0]["widgets_values"] == ["y.safetensors"]
    card = (folder / "README.md").read_text()
    assert dojo.model_card.parse_front_matter(card)["base_model"] == "me/base" and "workflow.json" in card


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("DOJO_ALLOW_PUBLISH", "1")  # the server owner's opt-in (off by default)
    return monkeypatch


def make_export(comfy, dojo, trained, name):
    return dojo.share_nodes.DojoExportModelCard.execute(name, "other", 1.0, lora_name=trained[1],
                                                        samples=torch.rand(1, 8, 8, 3)).result[0]


def test_publish_uploads_the_export_with_the_token_only_in_the_header(comfy, dojo, trained, hub_env):
    export = make_export(comfy, dojo, trained, "pub")
    folder = Path(comfy.folder_paths.get_output_directory()) / "dojo_exports" / export
    with HubMock() as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        url = dojo.share_nodes.DojoPublishToHub.execute("ann/zq-style", True, export=export).result[0]
    assert url == f"{hub.url}/ann/zq-style"
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert hub.files == local
    paths = [r["path"].split("?")[0] for r in hub.requests]
    assert paths[0] == "/api/repos/create" and json.loads(hub.requests[0]["body"])["visibility"] == "private"
    assert any("/preupload/main" in p for p in paths) and paths[-1] == "/api/models/ann/zq-style/commit/main"
    for r in hub.requests:
        assert r["headers"].get("authorization", r["headers"].get("Authorization")) == f"Bearer {FAKE_TOKEN}"
        assert FAKE_TOKEN not in r["path"] and FAKE_TOKEN.encode() not in r["body"]
        assert all(FAKE_TOKEN not in v for k, v in r["headers"].items() if k.lower() != "authorization")
    assert FAKE_TOKEN not in "\n".join(m for m in comfy.log.messages(0))


def test_publish_401_and_refused_connection_give_clear_messages_and_keep_the_export(comfy, dojo, trained, hub_env):
    export = make_export(comfy, dojo, trained, "fail")
    folder = Path(comfy.folder_paths.get_output_directory()) / "dojo_exports" / export
    before = sorted(p.name for p in folder.rglob("*"))
    publish = dojo.share_nodes.DojoPublishToHub.execute
    with HubMock(status=401) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(dojo.hub.PublishError, match=r"refused the token for ann/zq-style \(HTTP 401\)") as e:
            publish("ann/zq-style", False, export_folder=export)
    assert len(hub.requests) < 10 and FAKE_TOKEN not in str(e.value) and "left intact" in str(e.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    hub_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(dojo.hub.PublishError, match="could not reach .* to publish ann/zq-style"):
        publish("ann/zq-style", False, export=f"dojo_exports/{export}")
    assert sorted(p.name for p in folder.rglob("*")) == before
    with pytest.raises(dojo.hub.PublishError, match="not a Hugging Face repository id"):
        publish("no slash", False, export=export)
    with pytest.raises(ValueError, match="export"):
        publish("ann/x", False, export="../../etc")


TOKEN_LIKE = re.compile(r"(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16})")
ABSOLUTE = re.compile(r"(\"|^|\s)(/(home|root|Users|tmp|mnt|data|workspace)/|[A-Za-z]:\\\\)")


def test_shipped_workflows_and_saved_metadata_hold_no_paths_or_secrets(comfy, dojo, trained):
    texts = {str(p.relative_to(REPO_ROOT)): p.read_text() for p in sorted((REPO_ROOT / "workflows").glob("*.json"))}
    with safetensors.safe_open(str(loras_dir(comfy) / trained[1]), "pt") as f:
        texts["saved metadata"] = json.dumps(f.metadata())
    for name, text in texts.items():
        assert not TOKEN_LIKE.search(text), name
        assert not ABSOLUTE.search(text), (name, ABSOLUTE.search(text))
        assert str(comfy.base) not in text and os.path.expanduser("~") + "/" not in text, name
