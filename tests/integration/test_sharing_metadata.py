"""Saved LoRAs carry their training settings and the graph that trained it (scrubbed), for every family."""
import json

import pytest
import safetensors

from inprocess_models import tiny_flux_patcher, tiny_hunyuan_video_patcher, tiny_sd15_patcher
from test_lora_nodes import dojo, train_node  # noqa: F401  (module fixture)
from test_lora_training import encoded

pytestmark = pytest.mark.integration

BUILDERS = {"sd15": tiny_sd15_patcher, "flux": tiny_flux_patcher, "hunyuan_video": tiny_hunyuan_video_patcher}


def read_metadata(comfy, relative):
    root = comfy.folder_paths.get_folder_paths("loras")[0]
    with safetensors.safe_open(f"{root}/{relative}", "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("family", list(BUILDERS))
def test_saved_lora_metadata_round_trip(comfy, dojo, family):
    lora = train_node(dojo, BUILDERS[family](), encoded(dojo, family), steps=2, batch_size=1,
                      run_name=f"meta_{family}").result[0]
    saved = dojo.lora_nodes.DojoSaveLoRA.execute(lora, f"tests/meta_{family}", "fp16", trigger_word="zqx",
                                                 base_model_name="base.safetensors").result[0]
    meta = read_metadata(comfy, saved)
    settings = json.loads(meta["dojo_training"])
    assert meta["dojo_family"] == family and meta["dojo_kind"] == "lora" and meta["dojo_steps"] == "2"
    assert meta["dojo_trigger_word"] == "zqx" and meta["dojo_base_model"] == "base.safetensors"
    assert settings["family"] == family and settings["rank"] == 4 and settings["steps"] == 2
    assert settings["learning_rate"] == 1e-3 and settings["seed"] == 3 and settings["dataset_size"] == 4
    assert settings["optimizer"] == "adamw" and settings["precision"] == "fp32"
    loaded, _ = dojo.lora_nodes.DojoLoadLoRA.execute(saved).result
    assert loaded.metadata == meta


def test_graph_run_embeds_prompt_and_scrubbed_workflow(comfy, dojo, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "Q" * 34)
    lora = dojo.lora_training.DojoLoRA({"x.lora_down.weight": __import__("torch").ones(2, 2)}, {"dojo_family": "sd15"})
    first = dojo.lora_nodes.DojoSaveLoRA.execute(lora, "tests/graph_src", "fp32").result[0]
    n = comfy.node
    prompt = {"load": n("DojoLoadLoRA", lora_name=first),
              "save": n("DojoSaveLoRA", lora=["load", 0], filename_prefix="tests/graph_saved",
                        trigger_word="zqx", base_model_name="/home/ann/models/sd15.safetensors")}
    workflow = {"nodes": [{"id": 1, "type": "DojoSaveLoRA",
                           "widgets_values": ["/home/ann/ComfyUI/models/x.safetensors", "hf_" + "Q" * 34]}],
                "links": [], "extra": {"api_key_comfy_org": "comfyui-abc"}}
    result = comfy.run(prompt, extra_pnginfo={"workflow": workflow})
    assert result.success, result.error_message()
    meta = read_metadata(comfy, result.ui_outputs["save"]["text"][0])
    embedded_prompt, embedded_workflow = json.loads(meta["prompt"]), json.loads(meta["workflow"])
    assert embedded_prompt["save"]["class_type"] == "DojoSaveLoRA"
    assert embedded_prompt["save"]["inputs"]["base_model_name"] == "sd15.safetensors"
    assert embedded_workflow["nodes"][0]["widgets_values"] == ["x.safetensors", "<redacted>"]
    assert "api_key_comfy_org" not in embedded_workflow["extra"]
    assert meta["dojo_base_model"] == "sd15.safetensors"
    everything = json.dumps(meta)
    assert "/home/ann" not in everything and "Q" * 34 not in everything
