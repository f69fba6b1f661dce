"""The example workflows in workflows/ (UI format) against real ComfyUI: every node exists, every widget
value fits its input, every link joins matching types; each converts to the API format and runs end to
end with tiny stand-in models saved under the real file names; the server lists them as the pack's
templates."""
import json
import os
import urllib.request
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from comfy_harness import PACK_DIR_NAME, REPO_ROOT, comfyui_server, make_base_directory
from test_dataset_nodes import fresh_folder, image, video
from ui_workflows import FRONTEND_ONLY, schema, to_api, widget_problems

pytestmark = pytest.mark.integration

WORKFLOW_DIR = REPO_ROOT / "workflows"
WORKFLOWS = sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))
EXPECTED = {"dojo_flux_lora_trigger_word", "dojo_sdxl_lora_captions", "dojo_sdxl_pivotal_tuning",
            "dojo_sd15_textual_inversion",
            "dojo_hunyuan_video_lora_images", "dojo_hunyuan_video_lora_clips",
            "dojo_wan22_video_lora_clips", "dojo_wan_lora_images",
            "dojo_qwen_image_lora", "dojo_z_image_lora"}


def load(name) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


# ------------------------------------------------------------------- stand-in files and folders

@pytest.fixture(scope="module")
def stand_ins(comfy, tiny_clip_l, tiny_flux_vae, tiny_video_vae, tiny_hunyuan_video_unet,
              smallest_sdxl_checkpoint, tiny_sd15_checkpoint):
    """The workflows' real model file names, linked to tiny files of the same family, and their dataset
    folders in input/. Returns whether the Flux stand-in is a real (loader-detectable) Flux."""
    import tiny_files
    base = comfy.base
    models = base / "models"
    flux_ok = tiny_files.smallest_detectable_flux_hidden() <= 256 or os.environ.get("DOJO_BIG_TEST_MODELS") == "1"
    flux = tiny_files.provide_detectable_flux(base) if flux_ok else tiny_hunyuan_video_unet
    import tiny_wan
    wan21, wan_vae = tiny_wan.provide_wan21(base), tiny_wan.provide_wan21_vae(base)
    import tiny_qwen
    tiny_wan_vae = tiny_qwen.provide_wan21_taehv(base)
    for folder, real, tiny in [
        ("diffusion_models", "flux1-dev.safetensors", flux),  # a name only where Flux is not detectable small
        ("diffusion_models", "hunyuan_video_t2v_720p_bf16.safetensors", tiny_hunyuan_video_unet),
        ("text_encoders", "clip_l.safetensors", tiny_clip_l),
        # Only their names are needed: the tests load CLIP-L in place of T5-XXL / LLaVA-Llama-3 (see to_test_prompt).
        ("text_encoders", "t5xxl_fp16.safetensors", tiny_clip_l),
        ("text_encoders", "llava_llama3_fp8_scaled.safetensors", tiny_clip_l),
        ("vae", "ae.safetensors", tiny_flux_vae),
        ("vae", "hunyuan_video_vae_bf16.safetensors", tiny_video_vae),
        # Qwen-Image's VAE is Wan 2.1's: the TAEHV stand-in in fp32 is ComfyUI's Wan 2.1 tiny VAE (lighttaew2_1).
        ("vae", "qwen_image_vae.safetensors", tiny_wan_vae),
        # Only their names are needed: the tests put stand-in loader nodes in place of these (QWEN_STAND_INS).
        ("diffusion_models", "qwen_image_bf16.safetensors", tiny_hunyuan_video_unet),
        ("diffusion_models", "z_image_turbo_bf16.safetensors", tiny_hunyuan_video_unet),
        ("text_encoders", "qwen_2.5_vl_7b_fp8_scaled.safetensors", tiny_clip_l),
        ("text_encoders", "qwen_3_4b.safetensors", tiny_clip_l),
        ("checkpoints", "sd_xl_base_1.0.safetensors", smallest_sdxl_checkpoint),
        ("checkpoints", "v1-5-pruned-emaonly.safetensors", tiny_sd15_checkpoint),
        ("diffusion_models", "wan2.2_t2v_high_noise_14B_fp16.safetensors", wan21),
        ("diffusion_models", "wan2.2_t2v_low_noise_14B_fp16.safetensors", wan21),
        ("diffusion_models", "wan2.1_t2v_1.3B_bf16.safetensors", wan21),
        ("vae", "wan_2.1_vae.safetensors", wan_vae),
        ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", tiny_clip_l),  # a name only (to_test_prompt)
    ]:
        source = next(p for p in models.rglob(tiny) if p.is_file())
        tiny_files.link_into(base, folder, real, source.resolve())

    stamps = fresh_folder(comfy, "deltamon_stamps")  # trigger word only, no captions
    for i, colour in enumerate([(200, 30, 30), (30, 160, 60), (40, 40, 190)]):
        image(stamps / f"stamp{i}.png", (64, 64), colour)
    sdxl = fresh_folder(comfy, "sdxl_captioned")
    image(sdxl / "a.png", (64, 64), (180, 120, 40), "a brown square, flat colour")
    image(sdxl / "b.png", (64, 64), (40, 120, 180), "a blue square, flat colour")
    dog = fresh_folder(comfy, "ohwx_dog")  # pivotal tuning: captions with and without the trigger word
    image(dog / "a.png", (64, 64), (150, 110, 60), "[trigger] dog sitting on grass")
    image(dog / "b.png", (64, 64), (160, 120, 70), "a dog on a sofa")
    for video_family in ("hunyuan", "wan"):  # the video workflows' image and clip folders
        stills = fresh_folder(comfy, f"{video_family}_images")
        image(stills / "a.png", (64, 64), (120, 30, 30), "a red square standing still")
        image(stills / "b.png", (64, 64), (30, 30, 120), "[trigger] a blue square")
        clips = fresh_folder(comfy, f"{video_family}_clips")
        video(clips / "walk.mp4", 10, (64, 64), "a grey square fading in")
        video(clips / "turn.mp4", 9, (64, 64), "[trigger] brightening")
    tiny_wan.register_tiny_umt5_node(comfy)
    for folder, colours in (("qwen_image_style", [(200, 60, 40), (40, 160, 200)]),
                            ("z_image_subject", [(120, 90, 60), (60, 90, 120)])):
        captioned = fresh_folder(comfy, folder)
        image(captioned / "a.png", (64, 64), colours[0], "[trigger] a flat square")
        image(captioned / "b.png", (64, 64), colours[1], "a second square, painted in another colour entirely")
    tiny_qwen.register_stand_in_loaders()
    cats = fresh_folder(comfy, "my_cat")
    for i, colour in enumerate([(90, 60, 30), (120, 80, 40)]):
        image(cats / f"cat{i}.png", (64, 64), colour)
    # The "second embedding" the textual-inversion workflow's prompt names (an A1111-format SD1.5 file).
    (models / "embeddings").mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"emb_params": torch.randn(2, 768, generator=torch.Generator().manual_seed(0))},
                                str(models / "embeddings" / "my_style.safetensors"))
    return {"flux_detectable": flux_ok}


def schema_of(comfy):
    cache = {}

    def get(class_type):
        if class_type not in cache:
            cache[class_type] = schema(comfy.nodes, class_type)
        return cache[class_type]
    return get


# ------------------------------------------------------------------------------- the files

def test_the_shipped_workflows():
    assert set(WORKFLOWS) == EXPECTED
    for name in WORKFLOWS:
        thumb = WORKFLOW_DIR / f"{name}.jpg"
        assert thumb.is_file() and thumb.read_bytes()[:2] == b"\xff\xd8", f"{name}.jpg is not a JPEG"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_nodes_widgets_and_links_are_valid(comfy, stand_ins, name):
    wf = load(name)
    get = schema_of(comfy)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "node ids repeat"
    links = {l[0]: l for l in wf["links"]}
    assert len(links) == len(wf["links"]), "link ids repeat"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(links)

    problems = []
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        if node["type"] not in comfy.nodes.NODE_CLASS_MAPPINGS:
            problems.append(f"node {node['id']}: {node['type']} does not exist in ComfyUI {comfy.version}")
            continue
        sch = get(node["type"])
        problems += [f"node {node['id']}: {p}" for p in widget_problems(sch, node.get("widgets_values") or [])]
        sockets = {i.name: i for i in sch.sockets}
        listed = {slot["name"]: slot for slot in node.get("inputs", [])}
        for slot in node.get("inputs", []):
            if slot["name"] not in sockets and "widget" not in slot:
                problems.append(f"node {node['id']}: {node['type']} has no input socket {slot['name']}")
            elif slot.get("link") is not None and slot["link"] not in links:
                problems.append(f"node {node['id']}.{slot['name']}: dangling link {slot['link']}")
        for socket in sockets.values():
            if not socket.optional and (listed.get(socket.name) or {}).get("link") is None:
                problems.append(f"node {node['id']}: required input {node['type']}.{socket.name} is not connected")
        # Fewer outputs than the schema is what a file saved with an older ComfyUI looks like (SaveImage
        # gained an IMAGE output after 0.8); the frontend adds the missing ones back.
        if len(node.get("outputs", [])) > len(sch.outputs):
            problems.append(f"node {node['id']}: {len(node.get('outputs', []))} outputs, schema has {len(sch.outputs)}")
        for k, out in enumerate(node.get("outputs", [])):
            if k < len(sch.outputs) and out["type"] != sch.outputs[k][1]:
                problems.append(f"node {node['id']} output {k}: {out['type']}, schema {sch.outputs[k][1]}")
            for link_id in out.get("links") or []:
                if link_id not in links or links[link_id][1:3] != [node["id"], k]:
                    problems.append(f"node {node['id']} output {k}: link {link_id} does not start here")

    for link_id, a, a_slot, b, b_slot, kind in wf["links"]:
        src, dst = nodes.get(a), nodes.get(b)
        if src is None or dst is None:
            problems.append(f"link {link_id}: joins a missing node ({a} -> {b})")
            continue
        if a_slot >= len(src["outputs"]) or b_slot >= len(dst["inputs"]):
            problems.append(f"link {link_id}: slot out of range")
            continue
        out, inp = src["outputs"][a_slot], dst["inputs"][b_slot]
        if link_id not in (out.get("links") or []) or inp.get("link") != link_id:
            problems.append(f"link {link_id}: not recorded on both ends")
        schema_out = get(src["type"]).outputs[a_slot][1]
        schema_in = get(dst["type"]).input(inp["name"]).type
        if not (kind == out["type"] == inp["type"] == schema_out == schema_in):
            problems.append(f"link {link_id}: {src['type']}.{out['name']} ({out['type']}, schema {schema_out}) -> "
                            f"{dst['type']}.{inp['name']} ({inp['type']}, schema {schema_in}) as {kind}")
    assert problems == []


# Core nodes whose widgets did not change between ComfyUI 0.8 and 0.33.
STABLE_CORE_NODES = {"KSampler", "DualCLIPLoader", "UNETLoader", "VAELoader", "CLIPTextEncode", "FluxGuidance",
                     "EmptyHunyuanLatentVideo", "ModelSamplingSD3", "VAEDecodeTiled", "VAEDecode", "RandomNoise",
                     "BasicScheduler", "KSamplerSelect", "ConditioningZeroOut", "SaveImage"}


def test_widget_slots_read_comfyuis_own_templates(comfy):
    """The widget-order rules (ui_workflows.py) read files the real frontend saved: ComfyUI's own templates
    (seed + control_after_generate slot, optional widgets such as DualCLIPLoader's device)."""
    templates = pytest.importorskip("comfyui_workflow_templates_json")
    folder = Path(templates.__file__).parent / "templates"
    get = schema_of(comfy)
    checked, problems = set(), []
    for name in ("flux_canny_model_example", "hunyuan_video_text_to_video"):
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] in STABLE_CORE_NODES:
                checked.add(node["type"])
                problems += [f"{name}: {p}" for p in widget_problems(get(node["type"]), node.get("widgets_values") or [])
                             if "not among the options" not in p]  # model files not present here
    if not checked:
        pytest.skip("ComfyUI's Flux and HunyuanVideo templates are not installed")
    assert {"KSampler", "DualCLIPLoader", "RandomNoise", "VAEDecodeTiled"} <= checked
    assert problems == []


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_layout_notes_and_groups(name):
    wf = load(name)
    groups = wf["groups"]
    assert len(groups) >= 4
    lefts = [g["bounding"][0] for g in groups]
    assert lefts == sorted(lefts), "groups are not laid out left to right"
    for g, nxt in zip(groups, groups[1:]):
        assert g["bounding"][0] + g["bounding"][2] <= nxt["bounding"][0], f"{g['title']} overlaps {nxt['title']}"

    def group_of(node):
        x, y = node["pos"]
        inside = [g for g in groups if g["bounding"][0] <= x <= g["bounding"][0] + g["bounding"][2]
                  and g["bounding"][1] <= y <= g["bounding"][1] + g["bounding"][3]]
        return inside[0]["title"] if inside else None

    placed = {n["id"]: group_of(n) for n in wf["nodes"]}
    assert None not in placed.values(), [n["type"] for n in wf["nodes"] if placed[n["id"]] is None]
    noted = {placed[n["id"]] for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")}
    assert noted == {g["title"] for g in groups}, "every step has a note"
    text = " ".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note")
    assert "models/" in text and "input/" in text


# ---------------------------------------------------------------------------- end to end

# Small and short for the tiny stand-ins; everything else runs as the workflow sets it.
TEST_SETTINGS = {
    "DojoLoadImageDataset": dict(resolution=64, min_side=64, max_side=64),
    "DojoTrainLoRA": dict(steps=2, rank=4, precision="fp32", checkpoint_every=0, sample_steps=2, sample_width=64,
                          sample_height=64, sample_frames=5),
    "DojoLoRAGrid": dict(steps=2, seeds="1"),
    "DojoTrainTextualInversion": dict(steps=2, precision="fp32", checkpoint_every=0),
    "KSampler": dict(steps=2),
    "EmptySD3LatentImage": dict(width=64, height=64),
    "EmptyLatentImage": dict(width=64, height=64),
    "EmptyHunyuanLatentVideo": dict(width=64, height=64, length=5),
}


def to_test_prompt(comfy, wf: dict) -> dict:
    prompt = to_api(wf, schema_of(comfy))
    for node in prompt.values():
        node["inputs"].update(TEST_SETTINGS.get(node["class_type"], {}))
        if node["class_type"] == "DojoLoadImageDataset" and node["inputs"]["frames_per_clip"] > 1:
            node["inputs"]["frames_per_clip"] = 5  # 4k+1 like the workflow's 33
        if node["class_type"] == "DualCLIPLoader":
            # Substitution: DualCLIPLoader type flux builds a full-size T5-XXL (fixed 4096-wide config,
            # ~4.7 B params) and type hunyuan_video a Llama 3 whose tokenizer files ComfyUI does not ship,
            # so no tiny file loads there. The tiny Flux and HunyuanVideo stand-ins take 768-wide context
            # and pooled vectors: CLIP-L alone (CLIPLoader stable_diffusion) feeds them.
            assert node["inputs"]["clip_name1"] == "clip_l.safetensors"
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": "clip_l.safetensors", "type": "stable_diffusion", "device": "default"}
        if node["class_type"] == "CLIPLoader" and node["inputs"].get("type") == "wan":
            # Substitution: umt5-xxl has a fixed 5.7 B-parameter config and its tokenizer lives in the file;
            # tiny_wan's stand-in is ComfyUI's CLIP around ComfyUI's T5 with umt5's 4096-wide output.
            import tiny_wan
            node["class_type"], node["inputs"] = tiny_wan.TINY_UMT5_NODE, {}
        if node["class_type"] == "KSamplerAdvanced":
            # Wan 2.2's hand-over at step 10 of 20 becomes step 2 of 4, so both experts sample.
            node["inputs"]["steps"] = 4
            for key in ("start_at_step", "end_at_step"):
                if node["inputs"][key] == 10:
                    node["inputs"][key] = 2
        family = QWEN_STAND_INS.get((node["class_type"], node["inputs"].get("unet_name", node["inputs"].get("clip_name"))))
        if family is not None:
            # Substitution: ComfyUI builds Qwen2.5-VL-7B / Qwen3-4B from fixed configs whatever the file (7-8 B
            # params), and the smallest Qwen-Image file UNETLoader detects takes 3584-wide text. The stand-ins
            # are ComfyUI's own encoder classes and models with tiny configs (tiny_qwen.py), from test nodes;
            # UNETLoader's detection of the files is tested in test_qwen_zimage_lora.py.
            loader = "TinyQwenModelLoader" if node["class_type"] == "UNETLoader" else "TinyQwenCLIPLoader"
            node["class_type"], node["inputs"] = loader, {"family": family}
    return prompt


QWEN_STAND_INS = {("UNETLoader", "qwen_image_bf16.safetensors"): "qwen_image",
                  ("CLIPLoader", "qwen_2.5_vl_7b_fp8_scaled.safetensors"): "qwen_image",
                  ("UNETLoader", "z_image_turbo_bf16.safetensors"): "z_image",
                  ("CLIPLoader", "qwen_3_4b.safetensors"): "z_image"}


def run_workflow(comfy, name) -> tuple[dict, dict]:
    wf = load(name)
    prompt = to_test_prompt(comfy, wf)
    result = comfy.run(prompt)
    assert result.success, result.error_message()
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(result.ui_outputs.get(node_id))
    return wf, by_type


def check_saved_lora(comfy, outputs, trigger, base_model):
    saved = outputs["DojoSaveLoRA"][0]["text"][0]
    with safetensors.safe_open(str(comfy.base / "models" / "loras" / saved), "pt") as f:
        meta = f.metadata()
        assert len(list(f.keys())) > 0
    assert meta["dojo_steps"] == "2" and meta["dojo_base_model"] == base_model
    assert meta.get("dojo_trigger_word", "") == trigger
    return saved


def previews_of(comfy, run_name) -> list[str]:
    """The sample previews of the newest run called `run_name` (Train LoRA's sample_every)."""
    runs = sorted((comfy.base / "output" / "dojo_checkpoints").glob(f"{run_name}_*"))
    assert runs, run_name
    return sorted(p.name for p in (runs[-1] / "samples").iterdir())


def output_files(comfy, entries) -> list[Path]:
    files = [comfy.base / "output" / e.get("subfolder", "") / e["filename"] for e in entries]
    assert files and all(f.is_file() and f.stat().st_size > 0 for f in files)
    return files


def test_flux_workflow_runs(comfy, stand_ins):
    if not stand_ins["flux_detectable"]:
        pytest.skip(f"ComfyUI {comfy.version} detects Flux files only at hidden 3072 (~1.1 GB); "
                    "set DOJO_BIG_TEST_MODELS=1 to run the Flux workflow")
    wf, out = run_workflow(comfy, "dojo_flux_lora_trigger_word")
    saved = check_saved_lora(comfy, out, "DeltamonStamp", "flux1-dev.safetensors")
    assert saved.startswith("dojo/deltamon_stamp_flux_")
    output_files(comfy, out["SaveImage"][0]["images"])
    assert previews_of(comfy, "deltamon_stamp_flux") == ["step_000000.png", "step_000002.png"]
    # The grid over the run's checkpoints (here the final one, step 2) at 0.8 / 1.0 / 1.4.
    grid = next(n for n in wf["nodes"] if n["type"] == "DojoLoRAGrid")
    assert "0.8, 1.0, 1.4" in grid["widgets_values"] and "run checkpoints" in grid["widgets_values"]
    grid_files = output_files(comfy, out["SaveImage"][1]["images"])
    from PIL import Image
    with Image.open(grid_files[0]) as img:
        assert img.width > 3 * 64 and img.height > 64


def test_sdxl_workflow_runs(comfy, stand_ins):
    _, out = run_workflow(comfy, "dojo_sdxl_lora_captions")
    check_saved_lora(comfy, out, "", "sd_xl_base_1.0.safetensors")
    output_files(comfy, out["SaveImage"][0]["images"])


def test_sdxl_pivotal_workflow_runs_and_saves_the_pair(comfy, stand_ins):
    _, out = run_workflow(comfy, "dojo_sdxl_pivotal_tuning")
    saved = check_saved_lora(comfy, out, "ohwx", "sd_xl_base_1.0.safetensors")
    with safetensors.safe_open(str(comfy.base / "models" / "loras" / saved), "pt") as f:
        bundle = sorted(k for k in f.keys() if k.startswith("bundle_emb."))
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert bundle == []  # bundle_embedding is off: the file loads in LoraLoader with no unloaded key
    emb = out["DojoSaveLoRA"][0]["text"][1]  # Save LoRA wrote the embedding beside it
    assert emb.startswith("embedding:dojo/ohwx_dog_pivotal_") and meta["dojo_embedding_file"] == emb
    path = comfy.base / "models" / "embeddings" / (emb.split(":", 1)[1] + ".safetensors")
    with safetensors.safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"] and tuple(f.get_tensor("clip_g").shape) == (2, 1280)
    output_files(comfy, out["SaveImage"][0]["images"])


def test_sd15_textual_inversion_workflow_runs(comfy, stand_ins):
    wf, out = run_workflow(comfy, "dojo_sd15_textual_inversion")
    prompt_text = next(n for n in wf["nodes"] if n["type"] == "CLIPTextEncode")["widgets_values"][0]
    assert "(embedding:my_cat:1.2)" in prompt_text and "embedding:my_style" in prompt_text
    saved = out["DojoSaveEmbedding"][0]["text"][0]
    assert saved.startswith("embedding:my_cat_")
    path = comfy.base / "models" / "embeddings" / (saved.split(":", 1)[1] + ".safetensors")
    with safetensors.safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and tuple(f.get_tensor("emb_params").shape) == (4, 768)
        assert f.metadata()["dojo_base_model"] == "v1-5-pruned-emaonly.safetensors"
    output_files(comfy, out["SaveImage"][0]["images"])


@pytest.mark.parametrize("name", ["dojo_hunyuan_video_lora_images", "dojo_hunyuan_video_lora_clips"])
def test_hunyuan_video_workflows_run(comfy, stand_ins, name):
    wf, out = run_workflow(comfy, name)
    apply = next(n for n in wf["nodes"] if n["type"] == "DojoApplyLoRA")
    assert apply["widgets_values"][0] == 1.4
    check_saved_lora(comfy, out, "hvstyle", "hunyuan_video_t2v_720p_bf16.safetensors")
    assert previews_of(comfy, name.replace("dojo_", "")) == ["step_000000.webp", "step_000002.webp"]
    videos = output_files(comfy, out["SaveWEBM"][0]["images"])
    assert all(v.suffix == ".webm" for v in videos)
    import av
    with av.open(str(videos[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5


def test_wan_images_workflow_runs(comfy, stand_ins):
    _, out = run_workflow(comfy, "dojo_wan_lora_images")
    saved = check_saved_lora(comfy, out, "wanstyle", "wan2.1_t2v_1.3B_bf16.safetensors")
    with safetensors.safe_open(str(comfy.base / "models" / "loras" / saved), "pt") as f:
        assert all(k.startswith("diffusion_model.blocks.") for k in f.keys())
    assert previews_of(comfy, "wan_lora_images") == ["step_000000.webp", "step_000002.webp"]
    videos = output_files(comfy, out["SaveWEBM"][0]["images"])
    import av
    with av.open(str(videos[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5


def test_wan22_a14b_workflow_trains_each_expert_on_its_range_and_samples_with_both(comfy, stand_ins):
    wf, out = run_workflow(comfy, "dojo_wan22_video_lora_clips")
    trainers = {n["title"]: n for n in wf["nodes"] if n["type"] == "DojoTrainLoRA"}
    assert set(trainers) == {"Train LoRA: high-noise expert", "Train LoRA: low-noise expert"}
    saved = [entry["text"][0] for entry in out["DojoSaveLoRA"]]
    assert len(saved) == 2
    ranges = {}
    for name in saved:
        with safetensors.safe_open(str(comfy.base / "models" / "loras" / name), "pt") as f:
            meta = f.metadata()
        assert meta["dojo_steps"] == "2" and meta["dojo_trigger_word"] == "wanstyle"
        ranges[meta["dojo_base_model"]] = (json.loads(meta["dojo_timestep_range"]),
                                           meta["ss_min_timestep"], meta["ss_max_timestep"])
    assert ranges == {"wan2.2_t2v_high_noise_14B_fp16.safetensors": ([0.875, 1.0], "875", "1000"),
                      "wan2.2_t2v_low_noise_14B_fp16.safetensors": ([0.0, 0.875], "0", "875")}
    # Both experts sample, each with its own LoRA: high-noise steps 0-2, then low-noise 2-4 of 4.
    prompt = to_test_prompt(comfy, wf)
    samplers = sorted((n["inputs"]["start_at_step"], n["inputs"]["end_at_step"]) for n in prompt.values()
                      if n["class_type"] == "KSamplerAdvanced")
    assert samplers == [(0, 2), (2, 10000)]
    # Each expert samples with the LoRA trained on it.
    nodes = {n["id"]: n for n in wf["nodes"]}
    source = {(link[3], nodes[link[3]]["inputs"][link[4]]["name"]): nodes[link[1]] for link in wf["links"]}
    applies = [n for n in wf["nodes"] if n["type"] == "DojoApplyLoRA"]
    experts = {source[(a["id"], "model")]["title"] for a in applies}
    assert experts == {"Load high-noise expert", "Load low-noise expert"}
    for a in applies:
        trainer = source[(a["id"], "lora")]
        assert source[(trainer["id"], "model")] is source[(a["id"], "model")]
    videos = output_files(comfy, out["SaveWEBM"][0]["images"])
    import av
    with av.open(str(videos[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5


# ------------------------------------------------------------------------------- the server

def test_comfyui_serves_the_workflows_as_the_packs_templates(comfy, tmp_path):
    """ComfyUI 0.8 and 0.33 both scan custom_nodes/<pack>/{example_workflows, example, examples, workflow,
    workflows}/*.json for /workflow_templates and serve the folder under /api/workflow_templates/<pack>/."""
    base = make_base_directory(tmp_path / "server_base")
    with comfyui_server(base, tmp_path / "server.log", "/workflow_templates") as (server, templates):
        assert sorted(templates.get(PACK_DIR_NAME, [])) == WORKFLOWS
        name = WORKFLOWS[0]
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK_DIR_NAME}/{name}.json", timeout=10) as r:
            assert json.load(r) == load(name)
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg", timeout=10) as r:
            assert r.read()[:2] == b"\xff\xd8"


@pytest.mark.parametrize("name,trigger,base", [("dojo_qwen_image_lora", "qwnstyle", "qwen_image_bf16.safetensors"),
                                               ("dojo_z_image_lora", "zmgsubject", "z_image_turbo_bf16.safetensors")])
def test_qwen_family_workflows_run(comfy, stand_ins, name, trigger, base):
    _, out = run_workflow(comfy, name)
    saved = check_saved_lora(comfy, out, trigger, base)
    assert saved.startswith("dojo/" + name.replace("dojo_", "") + "_")
    output_files(comfy, out["SaveImage"][0]["images"])
    assert previews_of(comfy, name.replace("dojo_", "")) == ["step_000000.png", "step_000002.png"]
