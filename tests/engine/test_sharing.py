"""Sharing metadata is scrubbed of absolute paths and secrets; the model card has what the Hub reads."""
import json

from comfyui_dojo.training import model_card as mc
import pytest

from comfyui_dojo.training.files import next_free_path, write_new_folder
from comfyui_dojo.training.sharing import (REDACTED, describe_metadata, is_absolute_path, scrub,
                                           sharing_metadata, tag_frequency_summary)


def test_absolute_paths_are_relativised_and_tokens_redacted(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cr3t-value-123456")
    graph = {"1": {"class_type": "X", "inputs": {
        "ckpt": "/home/ann/models/flux1-dev.safetensors", "win": "C:\\Users\\ann\\lora.safetensors",
        "home": "~/datasets/cats", "text": "a cat, loaded from /home/ann/secret/place.png today",
        "slash_prompt": "/imagine a cat", "relative": "dojo/my_lora", "key": "hf_" + "a" * 34,
        "env": "uses s3cr3t-value-123456 inside", "api_key": "anything", "n": 3}}}
    out = scrub(graph)["1"]["inputs"]
    assert out["ckpt"] == "flux1-dev.safetensors" and out["win"] == "lora.safetensors" and out["home"] == "cats"
    assert out["text"] == "a cat, loaded from place.png today"
    assert out["slash_prompt"] == "/imagine a cat" and out["relative"] == "dojo/my_lora" and out["n"] == 3
    assert out["key"] == REDACTED and out["env"] == f"uses {REDACTED} inside" and "api_key" not in out
    assert is_absolute_path("/tmp/x/y") and not is_absolute_path("a/b")


def test_sharing_metadata_embeds_prompt_and_workflow_like_comfyui_pngs():
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15/tiny.safetensors"}}}
    workflow = {"nodes": [{"id": 1, "widgets_values": ["/root/models/tiny.safetensors"]}], "links": []}
    meta = sharing_metadata("lora", {"dojo_family": "sd15", "dojo_dataset": "/data/cats"}, prompt,
                            {"workflow": workflow})
    assert meta["dojo_kind"] == "lora" and meta["dojo_dataset"] == "cats"
    assert json.loads(meta["prompt"]) == prompt
    assert json.loads(meta["workflow"])["nodes"][0]["widgets_values"] == ["tiny.safetensors"]
    assert meta["dojo_base_model"] == "tiny.safetensors"
    assert all(isinstance(v, str) for v in meta.values())
    assert "prompt" not in sharing_metadata("lora", {}, None, None)


def test_describe_reads_kohya_keys_and_files_without_metadata():
    text = describe_metadata("x.safetensors", {
        "ss_network_dim": "32", "ss_network_alpha": "16", "ss_sd_model_name": "v1-5.ckpt", "ss_steps": "1500",
        "ss_tag_frequency": json.dumps({"10_cat": {"cat": 10, "sitting": 4}, "5_dog": {"cat": 2}})})
    assert "network dim (rank): 32" in text and "network alpha: 16" in text and "v1-5.ckpt" in text
    assert "cat (12), sitting (4)" in text
    assert "no metadata" in describe_metadata("y.safetensors", {})
    assert tag_frequency_summary("not json") is None


def test_model_card_front_matter_and_body():
    meta = {"dojo_family": "flux", "dojo_training": json.dumps({"rank": 4, "learning_rate": 0.0001}),
            "dojo_base_model": "flux1-dev.safetensors"}
    card = mc.CardInput("cat_style", "cat_style.safetensors", meta, license="flux-1-dev-non-commercial-license",
                        strength=0.8, trigger_word='zq "cat"', samples=["samples/sample_00.png"],
                        workflow_file="workflow.json")
    text = mc.model_card(card)
    front = mc.parse_front_matter(text)
    assert front["base_model"] == "black-forest-labs/FLUX.1-dev" and front["instance_prompt"] == 'zq "cat"'
    assert {"lora", "comfyui", "flux"} <= set(front["tags"]) and front["license"] == "flux-1-dev-non-commercial-license"
    assert "load_lora_weights" in text and "Dojo Apply LoRA" in text and "LoraLoader" in text
    assert "| rank | 4 |" in text and "0.8" in text and "![sample](samples/sample_00.png)" in text


def test_export_folders_are_new_complete_or_absent_and_never_reused(tmp_path):
    a = write_new_folder(next_free_path(tmp_path, "x", ""), lambda f: (f / "README.md").write_text("a"))
    b = write_new_folder(next_free_path(tmp_path, "x", ""), lambda f: (f / "README.md").write_text("b"))
    assert (a.name, b.name) == ("x_00001", "x_00002") and (a / "README.md").read_text() == "a"
    with pytest.raises(FileExistsError):
        write_new_folder(a, lambda f: None)

    def half(folder):
        (folder / "README.md").write_text("half")
        raise RuntimeError("stopped half way")
    with pytest.raises(RuntimeError):
        write_new_folder(tmp_path / "x_00003", half)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_00001", "x_00002"]  # no partial folder, no temporary
