"""Writes the example workflows in this folder (UI format, what ComfyUI's frontend loads) and their .jpg
thumbnails. Widget order and socket types come from a booted ComfyUI's node schemas, so run it with
ComfyUI's Python and the test harness:

    COMFYUI_PATH=~/ComfyUI OMP_NUM_THREADS=1 .venv/bin/python workflows/make_workflows.py

tests/integration/test_workflows.py checks the files against ComfyUI 0.33 and 0.8 and runs them.
"""
from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
sys.path.insert(0, str(HERE.parent / "tests"))
import pack_import  # noqa: E402,F401  (comfyui_dojo = this checkout, whatever pip installed)

from ui_workflows import schema as read_schema  # noqa: E402

GROUP_COLOR = "#3f789e"
NOTE_WIDTH = 340
COLUMN_GAP = 60
ROW_GAP = 40
TITLE_H = 30       # a node's title bar (not part of its size)
GROUP_PAD = 20
GROUP_HEADER = 50

# Save nodes that gained a pass-through IMAGE output after ComfyUI 0.8: saved without outputs, as
# ComfyUI's own templates do, so the file matches both versions (the frontend adds the output back).
NO_OUTPUTS_IN_OLDEST = {"SaveImage", "SaveWEBM", "PreviewImage"}

HF = "https://huggingface.co/"
MODELS = {
    "flux1-dev.safetensors": (HF + "black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors",
                              "diffusion_models"),
    "clip_l.safetensors": (HF + "comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
                           "text_encoders"),
    "t5xxl_fp16.safetensors": (HF + "comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
                               "text_encoders"),
    "ae.safetensors": (HF + "Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
                       "vae"),
    "v1-5-pruned-emaonly.safetensors": (HF + "Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                                        "v1-5-pruned-emaonly.safetensors", "checkpoints"),
    "sd_xl_base_1.0.safetensors": (HF + "stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                                   "sd_xl_base_1.0.safetensors", "checkpoints"),
    "hunyuan_video_t2v_720p_bf16.safetensors": (HF + "Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/"
                                                "diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors",
                                                "diffusion_models"),
    "llava_llama3_fp8_scaled.safetensors": (HF + "Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/"
                                            "text_encoders/llava_llama3_fp8_scaled.safetensors", "text_encoders"),
    "hunyuan_video_vae_bf16.safetensors": (HF + "Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/vae/"
                                           "hunyuan_video_vae_bf16.safetensors", "vae"),
    "wan2.2_t2v_high_noise_14B_fp16.safetensors": (HF + "Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/"
                                                   "split_files/diffusion_models/wan2.2_t2v_high_noise_14B_fp16.safetensors",
                                                   "diffusion_models"),
    "wan2.2_t2v_low_noise_14B_fp16.safetensors": (HF + "Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/"
                                                  "split_files/diffusion_models/wan2.2_t2v_low_noise_14B_fp16.safetensors",
                                                  "diffusion_models"),
    "wan2.1_t2v_1.3B_bf16.safetensors": (HF + "Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
                                         "diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors", "diffusion_models"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": (HF + "Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
                                               "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders"),
    "wan_2.1_vae.safetensors": (HF + "Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/vae/"
                                "wan_2.1_vae.safetensors", "vae"),
    "qwen_image_bf16.safetensors": (HF + "Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/diffusion_models/"
                                    "qwen_image_bf16.safetensors", "diffusion_models"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": (HF + "Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/"
                                              "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoders"),
    "qwen_image_vae.safetensors": (HF + "Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/"
                                   "qwen_image_vae.safetensors", "vae"),
    "z_image_turbo_bf16.safetensors": (HF + "Comfy-Org/z_image_turbo/resolve/main/split_files/diffusion_models/"
                                       "z_image_turbo_bf16.safetensors", "diffusion_models"),
    "qwen_3_4b.safetensors": (HF + "Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/"
                              "qwen_3_4b.safetensors", "text_encoders"),
}


class Workflow:
    """Nodes are placed in groups laid out left to right; within a group, top to bottom."""

    def __init__(self, comfy, name: str):
        self.comfy, self.name = comfy, name
        self.nodes, self.links, self.groups = [], [], []
        self._groups = []   # (group title, [columns of nodes])
        self._schemas = {}

    def schema(self, class_type):
        if class_type not in self._schemas:
            self._schemas[class_type] = read_schema(self.comfy.nodes, class_type)
        return self._schemas[class_type]

    def group(self, title: str):
        self._groups.append((title, [[]]))

    def column(self):
        """Start a new column inside the current group."""
        self._groups[-1][1].append([])

    def _place(self, node):
        self._groups[-1][1][-1].append(node)
        self.nodes.append(node)
        return node

    def note(self, text: str, title: str = "Note", height: int | None = None):
        lines = sum(max(1, len(line) // 46 + 1) for line in text.split("\n"))
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": [0, 0],
                "size": [NOTE_WIDTH, height or 20 + 18 * lines], "flags": {}, "order": 0, "mode": 0,
                "inputs": [], "outputs": [], "title": title, "properties": {}, "widgets_values": [text],
                "color": "#432", "bgcolor": "#653"}
        return self._place(node)

    def add(self, class_type: str, title: str | None = None, node_width: int = 320, **widgets):
        sch = self.schema(class_type)
        defaults = self.comfy.widget_defaults(class_type)
        values = []
        for w, control in sch.widget_slots():
            if control:
                values.append(widgets.pop(w.name + "_control", "fixed"))
            elif w.name in widgets:
                values.append(widgets.pop(w.name))
            else:
                values.append(defaults[w.name])
        if widgets:
            raise KeyError(f"{class_type} has no widgets {list(widgets)}")
        sockets = [{"name": i.name, "type": i.type, "link": None, **({"shape": 7} if i.optional else {})}
                   for i in sch.sockets]
        outputs = [{"name": n, "type": t, "links": [], "slot_index": k} for k, (n, t) in enumerate(sch.outputs)]
        if class_type in NO_OUTPUTS_IN_OLDEST:
            outputs = []
        rows = max(len(sockets), len(outputs)) + len(values)
        height = 26 + 24 * rows + (60 if any(i.options.get("multiline") for i in sch.widgets) else 0)
        if class_type in ("SaveImage", "PreviewImage"):
            height = max(height, 300)
        properties = {"Node name for S&R": class_type}
        files = [v for v in values if isinstance(v, str) and v in MODELS]
        if files:
            properties["models"] = [{"name": f, "url": MODELS[f][0], "directory": MODELS[f][1]} for f in files]
        node = {"id": len(self.nodes) + 1, "type": class_type, "pos": [0, 0], "size": [node_width, height],
                "flags": {}, "order": 0, "mode": 0, "inputs": sockets, "outputs": outputs,
                "properties": properties, "widgets_values": values}
        if title:
            node["title"] = title
        return self._place(node)

    def link(self, src: dict, output: str | int, dst: dict, input_name: str):
        slot = output if isinstance(output, int) else [o["name"] for o in src["outputs"]].index(output)
        out = src["outputs"][slot]
        target = next(i for i in dst["inputs"] if i["name"] == input_name)
        assert out["type"] == target["type"], (src["type"], out, dst["type"], target)
        link_id = len(self.links) + 1
        self.links.append([link_id, src["id"], slot, dst["id"], dst["inputs"].index(target), out["type"]])
        out["links"].append(link_id)
        target["link"] = link_id

    def _layout(self):
        x = 0
        for gid, (title, columns) in enumerate(self._groups, 1):
            left, bottom = x, 0
            for nodes in columns:
                width = max(n["size"][0] for n in nodes)
                y = GROUP_HEADER
                for n in nodes:
                    n["pos"] = [x + GROUP_PAD, y + TITLE_H]
                    y += n["size"][1] + TITLE_H + ROW_GAP
                bottom = max(bottom, y - ROW_GAP + GROUP_PAD)
                x += width + GROUP_PAD
            self.groups.append({"id": gid, "title": title, "bounding": [left, 0, x + GROUP_PAD - left, bottom],
                                "color": GROUP_COLOR, "font_size": 24, "flags": {}})
            x += GROUP_PAD + COLUMN_GAP

    def _order(self):
        """Execution order the frontend stores: a topological order of the link graph."""
        preds = {n["id"]: set() for n in self.nodes}
        for _, a, _, b, _, _ in self.links:
            preds[b].add(a)
        done, order = set(), []
        while len(order) < len(self.nodes):
            for n in self.nodes:
                if n["id"] not in done and preds[n["id"]] <= done:
                    done.add(n["id"])
                    order.append(n)
                    break
        for k, n in enumerate(order):
            n["order"] = k

    def to_json(self) -> dict:
        self._layout()
        self._order()
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-dojo/" + self.name)), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [40, 60]}}, "version": 0.4}


# ------------------------------------------------------------------------------------- shared steps

def train_group(w, model, encoded, recipe_note, train, run_name):
    w.group("Step 3 - Train the LoRA")
    w.note(recipe_note, title="Train")
    trainer = w.add("DojoTrainLoRA", node_width=340, run_name=run_name, **train)
    w.link(model, "MODEL", trainer, "model")
    w.link(encoded, "encoded_dataset", trainer, "dataset")
    return trainer


def save_group(w, trainer, prefix, trigger, base_name, dtype="fp16"):
    w.group("Step 5 - Save the LoRA")
    w.note("Dojo Save LoRA writes models/loras/<filename_prefix>_00001.safetensors (never overwrites: "
           "the number goes up) with kohya/ComfyUI keys that LoraLoader, diffusers and other UIs load. "
           "The trigger word, base model, dataset and settings go into the file's metadata.\n\n"
           "To use it later without training: LoraLoaderModelOnly, or Dojo Load LoRA + Dojo Apply LoRA.",
           title="Save")
    saver = w.add("DojoSaveLoRA", node_width=340, filename_prefix=prefix, save_dtype=dtype, trigger_word=trigger,
                  base_model_name=base_name)
    w.link(trainer, "lora", saver, "lora")
    return saver


def preview(w, trainer, positive, negative, vae):
    """Train LoRA previews the sampling prompt (with the trigger word) every 250 steps while it trains."""
    w.link(positive, "CONDITIONING", trainer, "preview_positive")
    w.link(negative, "CONDITIONING", trainer, "preview_negative")
    w.link(vae, "VAE", trainer, "preview_vae")


def dataset_group(w, vae, clip, note, cache=True, **dataset):
    w.group("Step 2 - Dataset")
    w.note(note, title="Dataset")
    data = w.add("DojoLoadImageDataset", node_width=340, **dataset)
    enc = w.add("DojoEncodeDataset", node_width=340, cache_to_disk=cache)
    w.link(data, "dataset", enc, "dataset")
    w.link(vae, "VAE", enc, "vae")
    w.link(clip, "CLIP", enc, "clip")
    return enc


def sd_text_to_image(w, model, clip, vae, positive, negative, size, prefix):
    """SD1.5 / SDXL sampling as usual: prompts, KSampler (25 steps, cfg 7, dpmpp_2m / karras), decode,
    save. `model` and `clip` are (node, output) pairs; `vae` is a node with a VAE output."""
    pos = w.add("CLIPTextEncode", node_width=380, text=positive)
    w.link(*clip, pos, "clip")
    neg = w.add("CLIPTextEncode", node_width=380, title="Negative", text=negative)
    w.link(*clip, neg, "clip")
    w.column()
    latent = w.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    sampler = w.add("KSampler", seed=42, steps=25, cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras",
                    denoise=1.0)
    w.link(*model, sampler, "model")
    w.link(pos, "CONDITIONING", sampler, "positive")
    w.link(neg, "CONDITIONING", sampler, "negative")
    w.link(latent, "LATENT", sampler, "latent_image")
    decode = w.add("VAEDecode")
    w.link(sampler, "LATENT", decode, "samples")
    w.link(vae, "VAE", decode, "vae")
    image = w.add("SaveImage", node_width=400, filename_prefix=prefix)
    w.link(decode, "IMAGE", image, "images")


# ------------------------------------------------------------------------------------------ Flux

def flux_lora(comfy) -> Workflow:
    w = Workflow(comfy, "dojo_flux_lora_trigger_word")
    w.group("Step 1 - Load Flux.1 [dev]")
    w.note("Flux.1 [dev] LoRA from a folder of images with a trigger word and no captions.\n\n"
           "Models (the standard Flux files):\n"
           "- models/diffusion_models/flux1-dev.safetensors (gated: accept the licence on Hugging Face)\n"
           "- models/text_encoders/clip_l.safetensors, t5xxl_fp16.safetensors\n"
           "- models/vae/ae.safetensors\n\n"
           "Training needs the bf16 model: ~24 GB of GPU memory at rank 16 with gradient checkpointing "
           "(on by default for Flux). weight_dtype fp8 saves memory for sampling.", title="Read me")
    unet = w.add("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = w.add("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
                 type="flux", device="default")
    vae = w.add("VAELoader", vae_name="ae.safetensors")
    enc = dataset_group(
        w, vae, clip,
        "Put 10-30 images of your subject in ComfyUI/input/deltamon_stamps (any size, any aspect: they "
        "are sorted into buckets of about resolution x resolution pixels). No .txt captions are needed: "
        "each image is captioned with the trigger word alone. Files with a .txt next to them use that "
        "caption (write [trigger] where the word goes, else it is put in front).\n\n"
        "Pick a trigger word that means nothing yet (DeltamonStamp), and put it in your prompts later.\n\n"
        "Dojo Encode Dataset encodes every image once with the VAE and the caption once with CLIP-L + T5: "
        "training then runs without them. cache_to_disk keeps the encodings in output/dojo_cache for the "
        "next run.",
        folder="deltamon_stamps", trigger_word="DeltamonStamp", resolution=512, max_side=1024)
    trainer = train_group(
        w, unet, enc,
        "The Flux recipe: rank 16, 1000 steps, learning rate 1e-4, AdamW, batch 1, bf16 autocast with "
        "fp32 LoRA weights. Flow-matching objective; 'auto' timesteps sample with the Flux shift "
        "(~3.16). Training adapts attention + MLP layers ('auto').\n\n"
        "The loss graph appears on the node while it trains, with a preview of the Step 4 prompt every 250 "
        "steps (sample_every; also saved in the run's samples/ folder). Cancel (the queue's X) keeps what was "
        "trained: a checkpoint every 250 steps and at the end goes to output/dojo_checkpoints/<run_name>; "
        "set resume_from to that folder to continue. The seed widget is 'fixed' so that running the graph "
        "again does not train again (ComfyUI caches the result).",
        dict(steps=1000, rank=16, learning_rate=1e-4, precision="bf16", checkpoint_every=250, seed=42), "deltamon_stamp_flux")
    w.group("Step 4 - Try it: apply and sample")
    w.note("Dojo Apply LoRA patches a copy of the model (the loaded one is untouched): strength_model "
           "is the slider, 1.0 as trained, 0 = off, up to ~1.5 to exaggerate.\n\n"
           "Sampling is Flux dev as usual: FluxGuidance 3.5, cfg 1, euler / simple, 20 steps, and "
           "a prompt with the trigger word.", title="Apply and sample")
    apply = w.add("DojoApplyLoRA", strength_model=1.0, strength_clip=1.0)
    w.link(unet, "MODEL", apply, "model")
    w.link(trainer, "lora", apply, "lora")
    pos = w.add("CLIPTextEncode", node_width=380,
                text="DeltamonStamp, a postage stamp showing a lighthouse on a rocky coast at dawn")
    w.link(clip, "CLIP", pos, "clip")
    guidance = w.add("FluxGuidance", guidance=3.5)
    w.link(pos, "CONDITIONING", guidance, "conditioning")
    neg = w.add("ConditioningZeroOut", title="Negative (unused at cfg 1)")
    w.link(pos, "CONDITIONING", neg, "conditioning")
    preview(w, trainer, guidance, neg, vae)
    w.column()
    latent = w.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    sampler = w.add("KSampler", seed=42, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    w.link(apply, "model", sampler, "model")
    w.link(guidance, "CONDITIONING", sampler, "positive")
    w.link(neg, "CONDITIONING", sampler, "negative")
    w.link(latent, "LATENT", sampler, "latent_image")
    decode = w.add("VAEDecode")
    w.link(sampler, "LATENT", decode, "samples")
    w.link(vae, "VAE", decode, "vae")
    image = w.add("SaveImage", node_width=400, filename_prefix="dojo/deltamon_stamp_flux")
    w.link(decode, "IMAGE", image, "images")
    save_group(w, trainer, "dojo/deltamon_stamp_flux", "DeltamonStamp", "flux1-dev.safetensors", "bf16")
    w.group("Step 6 - Which checkpoint, at which strength?")
    w.note("Dojo LoRA Grid samples every checkpoint of this run (rows: steps 250, 500, 750, 1000) at strengths "
           "0.8, 1.0 and 1.4 and two seeds (columns), with the same prompt and sampler as above, and labels "
           "each row and column. Pick the step and strength that show the subject without overcooking it; "
           "the checkpoints stay in output/dojo_checkpoints/<run_name>. Add 0 to strengths for the base model "
           "beside them. 24 images at 768 x 768: a few minutes on a 24 GB GPU.", title="Grid")
    grid_latent = w.add("EmptySD3LatentImage", width=768, height=768, batch_size=1)
    grid = w.add("DojoLoRAGrid", node_width=360, strengths="0.8, 1.0, 1.4", seeds="42, 43", steps=20, cfg=1.0,
                 sampler_name="euler", scheduler="simple", rows="run checkpoints")
    w.link(unet, "MODEL", grid, "model")
    w.link(vae, "VAE", grid, "vae")
    w.link(guidance, "CONDITIONING", grid, "positive")
    w.link(neg, "CONDITIONING", grid, "negative")
    w.link(grid_latent, "LATENT", grid, "latent")
    w.link(trainer, "lora", grid, "lora_1")
    w.column()
    shown = w.add("SaveImage", node_width=400, filename_prefix="dojo/deltamon_stamp_flux_grid")
    w.link(grid, "grid", shown, "images")
    return w


# ------------------------------------------------------------------------------------------ SDXL

def sdxl_lora(comfy) -> Workflow:
    w = Workflow(comfy, "dojo_sdxl_lora_captions")
    w.group("Step 1 - Load SDXL")
    w.note("SDXL LoRA from a folder of captioned images.\n\n"
           "Model: models/checkpoints/sd_xl_base_1.0.safetensors (UNet, both text encoders and the VAE "
           "in one file). Training at 1024 needs ~12-16 GB of GPU memory at rank 16 with gradient "
           "checkpointing (on by default for SDXL).", title="Read me")
    ckpt = w.add("CheckpointLoaderSimple", ckpt_name="sd_xl_base_1.0.safetensors")
    enc = dataset_group(
        w, ckpt, ckpt,
        "Put your images in ComfyUI/input/sdxl_captioned, each with a .txt of the same name holding its "
        "caption (e.g. photo.png + photo.txt). Describe what should stay variable; what is never "
        "described is learnt as part of the style/subject. A trigger word is optional here: set one to "
        "have it put in front of every caption (or where a caption says [trigger]).\n\n"
        "Subfolders named N_name (kohya layout) repeat their images N times per epoch. Buckets: about "
        "1024 x 1024 pixels at any aspect ratio, sides multiples of 64.",
        folder="sdxl_captioned", trigger_word="", resolution=1024, min_side=512, max_side=2048)
    trainer = train_group(
        w, ckpt, enc,
        "The SDXL recipe: rank 16, 1500 steps, learning rate 1e-4, AdamW, batch 1; eps objective with "
        "uniform timesteps; min_snr_gamma 5 steadies the loss. Only the UNet is trained ('auto' = "
        "attention + MLP layers).\n\n"
        "Cancel keeps a checkpoint in output/dojo_checkpoints/<run_name> (one every 500 steps here); "
        "resume_from continues it.",
        dict(steps=1500, rank=16, learning_rate=1e-4, min_snr_gamma=5.0, precision="bf16",
             checkpoint_every=500, seed=42), "sdxl_captioned")
    w.group("Step 4 - Try it: apply and sample")
    w.note("Dojo Apply LoRA: strength_model is the slider (1.0 as trained). Then SDXL as usual: "
           "1024 x 1024, 25 steps, cfg 7, dpmpp_2m / karras.", title="Apply and sample")
    apply = w.add("DojoApplyLoRA", strength_model=1.0, strength_clip=1.0)
    w.link(ckpt, "MODEL", apply, "model")
    w.link(trainer, "lora", apply, "lora")
    sd_text_to_image(w, (apply, "model"), (ckpt, "CLIP"), ckpt,
                     "a photo in the style of your captions, a quiet harbour at dusk",
                     "blurry, low quality, watermark", 1024, "dojo/sdxl_captioned")
    save_group(w, trainer, "dojo/sdxl_captioned", "", "sd_xl_base_1.0.safetensors")
    return w


def sdxl_pivotal(comfy) -> Workflow:
    w = Workflow(comfy, "dojo_sdxl_pivotal_tuning")
    w.group("Step 1 - Load SDXL")
    w.note("SDXL pivotal tuning: a LoRA and a new embedding for the trigger word, trained together in one "
           "run. The trigger word then carries what the LoRA learnt, and the embedding combines with other "
           "words and embeddings in prompts.\n\n"
           "Model: models/checkpoints/sd_xl_base_1.0.safetensors (UNet, CLIP-L + CLIP-G and the VAE). "
           "~14-18 GB of GPU memory at 1024 with gradient checkpointing: the text encoders run every step "
           "because the embedding trains.", title="Read me")
    ckpt = w.add("CheckpointLoaderSimple", ckpt_name="sd_xl_base_1.0.safetensors")
    enc = dataset_group(
        w, ckpt, ckpt,
        "Put 10-30 images of your subject in ComfyUI/input/ohwx_dog, with or without .txt captions. The "
        "trigger word ohwx is put in front of every caption (or where a caption says [trigger]); during "
        "training it is replaced by the new embedding.",
        folder="ohwx_dog", trigger_word="ohwx", resolution=1024, min_side=512, max_side=2048)
    trainer = train_group(
        w, ckpt, enc,
        "Dojo Pivotal Embedding turns the trigger word into a new embedding (2 vectors per text encoder, "
        "starting from 'dog') with its own learning rate 1e-3; train_fraction 0.5 stops it halfway while "
        "the LoRA (rank 16, 1e-4, 1500 steps) goes on. Train LoRA needs the CLIP for this: the captions "
        "are encoded each step with the embedding spliced in; the CLIP itself is not changed.\n\n"
        "The loss graph shows on the node while it trains; cancel keeps a checkpoint.",
        dict(steps=1500, rank=16, learning_rate=1e-4, min_snr_gamma=5.0, precision="bf16",
             checkpoint_every=500, seed=42), "ohwx_dog_pivotal")
    pivotal = w.add("DojoPivotalEmbedding", node_width=340, embedding_name="ohwx_dog", trigger_word="ohwx",
                    num_vectors=2, init_word="dog", learning_rate=1e-3, train_fraction=0.5)
    w.link(ckpt, "CLIP", trainer, "clip")
    w.link(pivotal, "pivotal", trainer, "pivotal")
    w.group("Step 4 - Preview: apply the pair and sample")
    w.note("Dojo Apply LoRA patches copies of the model and CLIP; Dojo LoRA Embedding takes the trained "
           "embedding out of the LoRA and Dojo Apply Embedding teaches it to the CLIP, so the prompt can say "
           "embedding:ohwx_dog. Once saved (Step 5), the same pair is LoraLoader + embedding:<file name> "
           "in any ComfyUI graph.", title="Preview")
    apply = w.add("DojoApplyLoRA", strength_model=1.0, strength_clip=1.0)
    w.link(ckpt, "MODEL", apply, "model")
    w.link(trainer, "lora", apply, "lora")
    w.link(ckpt, "CLIP", apply, "clip")
    emb = w.add("DojoLoRAEmbedding")
    w.link(trainer, "lora", emb, "lora")
    taught = w.add("DojoApplyEmbedding", name="ohwx_dog")
    w.link(apply, "clip", taught, "clip")
    w.link(emb, "embedding", taught, "embedding")
    sd_text_to_image(w, (apply, "model"), (taught, "clip"), ckpt,
                     "a photo of embedding:ohwx_dog dog running on a beach, golden hour",
                     "blurry, low quality, watermark", 1024, "dojo/ohwx_dog_pivotal")
    save_group(w, trainer, "dojo/ohwx_dog_pivotal", "ohwx", "sd_xl_base_1.0.safetensors")
    w.note("For a pivotal LoRA, Dojo Save LoRA also writes the embedding as its own file, "
           "models/embeddings/dojo/ohwx_dog_pivotal_00001.safetensors: in ComfyUI use LoraLoader + "
           "embedding:dojo/ohwx_dog_pivotal_00001 in the prompt (shown on the node). For A1111 / Forge turn on "
           "bundle_embedding: the embedding then also travels inside the LoRA file, which ComfyUI's LoraLoader "
           "reports as 'lora key not loaded' lines (harmless).", title="The embedding")
    return w


# ----------------------------------------------------------------------- SD1.5 textual inversion

def sd15_textual_inversion(comfy) -> Workflow:
    w = Workflow(comfy, "dojo_sd15_textual_inversion")
    w.group("Step 1 - Load SD1.5")
    w.note("SD1.5 textual inversion: teach the text encoder a new word (a few vectors, a file of a few "
           "KB) from a handful of images, then use it in prompts with weights, beside other embeddings.\n\n"
           "Model: models/checkpoints/v1-5-pruned-emaonly.safetensors. The same nodes train SDXL "
           "embeddings (clip_l + clip_g) from an SDXL checkpoint.", title="Read me")
    ckpt = w.add("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    w.group("Step 2 - Dataset")
    w.note("Put 5-20 images of your object in ComfyUI/input/my_cat. With captions = object, each image "
           "is paired with templates like 'a photo of {token}'; 'style' uses 'in the style of {token}'; "
           "'captions' uses your .txt files, where [trigger] or the trigger word marks the new word.",
           title="Dataset")
    data = w.add("DojoLoadImageDataset", node_width=340, folder="my_cat", resolution=512, min_side=256,
                 max_side=768)
    w.group("Step 3 - Train the embedding")
    w.note("Trains only the new vectors (fp32), with the model's own objective; the VAE encodes each image "
           "once, the text encoder runs every step. Recipe: 4 vectors initialised from 'cat', learning rate "
           "5e-4, 1500 steps. Cancel keeps a checkpoint in output/dojo_checkpoints/<run_name>; resume_from "
           "continues it. The MODEL and CLIP are never changed.", title="Train")
    trainer = w.add("DojoTrainTextualInversion", node_width=340, embedding_name="my_cat", captions="object",
                    num_vectors=4, init_word="cat", steps=1500, learning_rate=5e-4, precision="bf16", seed=42,
                    checkpoint_every=500, run_name="my_cat_embedding")
    w.link(ckpt, "MODEL", trainer, "model")
    w.link(ckpt, "CLIP", trainer, "clip")
    w.link(ckpt, "VAE", trainer, "vae")
    w.link(data, "dataset", trainer, "dataset")
    w.group("Step 4 - Use it in a prompt")
    w.note("Dojo Apply Embedding gives a CLIP that knows the new embedding without saving a file. Prompts "
           "use ComfyUI's own syntax: embedding:my_cat, with a weight (embedding:my_cat:1.2), and other "
           "embeddings from models/embeddings in the same prompt (embedding:my_style here: any embedding "
           "you have, e.g. one saved earlier by Dojo Save Embedding).", title="Apply and sample")
    apply = w.add("DojoApplyEmbedding", name="my_cat")
    w.link(ckpt, "CLIP", apply, "clip")
    w.link(trainer, "embedding", apply, "embedding")
    sd_text_to_image(w, (ckpt, "MODEL"), (apply, "clip"), ckpt,
                     "a photo of (embedding:my_cat:1.2) on a windowsill, embedding:my_style",
                     "blurry, low quality", 512, "dojo/my_cat_embedding")
    w.group("Step 5 - Save the embedding")
    w.note("Dojo Save Embedding writes models/embeddings/my_cat_00001.safetensors (emb_params, as A1111 "
           "and ComfyUI read it; never overwrites). Any prompt can then use embedding:my_cat_00001 without "
           "this graph.", title="Save")
    saver = w.add("DojoSaveEmbedding", node_width=340, filename_prefix="my_cat", save_dtype="fp32",
                  base_model_name="v1-5-pruned-emaonly.safetensors")
    w.link(trainer, "embedding", saver, "embedding")
    return w


# --------------------------------------------------------------------------------- HunyuanVideo

def hunyuan_lora(comfy, clips: bool) -> Workflow:
    name = "dojo_hunyuan_video_lora_clips" if clips else "dojo_hunyuan_video_lora_images"
    w = Workflow(comfy, name)
    w.group("Step 1 - Load HunyuanVideo")
    w.note("HunyuanVideo LoRA from " + ("video clips" if clips else "captioned images") + ".\n\n"
           "Models (ComfyUI's repackaged HunyuanVideo files):\n"
           "- models/diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors\n"
           "- models/text_encoders/clip_l.safetensors, llava_llama3_fp8_scaled.safetensors\n"
           "- models/vae/hunyuan_video_vae_bf16.safetensors\n\n"
           "Training needs ~24 GB of GPU memory (bf16 model, gradient checkpointing on by default)"
           + (", more with longer clips or higher resolution." if clips else "."), title="Read me")
    unet = w.add("UNETLoader", node_width=360, unet_name="hunyuan_video_t2v_720p_bf16.safetensors", weight_dtype="default")
    clip = w.add("DualCLIPLoader", node_width=360, clip_name1="clip_l.safetensors",
                 clip_name2="llava_llama3_fp8_scaled.safetensors", type="hunyuan_video", device="default")
    vae = w.add("VAELoader", node_width=360, vae_name="hunyuan_video_vae_bf16.safetensors")
    if clips:
        enc = dataset_group(
            w, vae, clip,
            "Put video files (mp4, webm, mov, ...) in ComfyUI/input/hunyuan_clips, each with a .txt caption "
            "of the same name (clip.mp4 + clip.txt); images in the folder are skipped at frames_per_clip > 1. "
            "The trigger word goes in front of every caption (or where it says [trigger]).\n\n"
            "Clips: frames_per_clip must be 4k+1 (HunyuanVideo's VAE packs 4 frames per latent after the "
            "first): 33 frames = 1.4 s at 24 fps. target_fps 24 resamples every video first. "
            "clip_mode 'uniform' takes clips_per_video clips spread over each video ('head' = one from "
            "the start, 'sliding' = one every stride frames). Resolution 384 keeps 33-frame clips "
            "within 24 GB; raise it if you have the memory.",
            folder="hunyuan_clips", trigger_word="hvstyle", resolution=384, min_side=256, max_side=768,
            frames_per_clip=33, clip_mode="uniform", clips_per_video=2, target_fps=24.0)
    else:
        enc = dataset_group(
            w, vae, clip,
            "Put your images (the seed recipe: 58) in ComfyUI/input/hunyuan_images, each with a .txt "
            "caption of the same name. The trigger word (hvstyle) goes in front of every caption, or "
            "where a caption says [trigger].\n\n"
            "Images train HunyuanVideo as one-frame videos (frames_per_clip 1): the style or subject "
            "carries over to generated videos. Buckets of about 512 x 512 pixels, any aspect ratio.",
            folder="hunyuan_images", trigger_word="hvstyle", resolution=512, min_side=256, max_side=1024)
    trainer = train_group(
        w, unet, enc,
        "The HunyuanVideo recipe: rank 32, learning rate 2e-4 (0 = these family defaults), "
        + ("1500" if clips else "1000") + " steps, AdamW, batch 1, bf16 autocast. Flow-matching objective; "
        "'auto' timesteps sample with HunyuanVideo's shift 7. Training adapts all linear layers of the "
        "transformer blocks ('auto').\n\n"
        "Every 250 steps the node previews the Step 4 prompt as a "
        + ("17-frame video" if clips else "5-frame video (short: a training step on a still is cheap next to "
           "sampling many frames)")
        + ", shown animated and saved as samples/step_NNNNNN.webp. Cancel keeps a checkpoint in output/dojo_checkpoints/<run_name> (one "
        "every 250 steps here); resume_from continues it.",
        dict(steps=1500 if clips else 1000, rank=32, learning_rate=2e-4, precision="bf16", checkpoint_every=250,
             seed=42, sample_frames=17 if clips else 5), name.replace("dojo_", ""))
    w.group("Step 4 - Try it: apply and make a video")
    w.note("Dojo Apply LoRA at strength 1.4: HunyuanVideo LoRAs trained on "
           + ("short clips" if clips else "images") + " often need more than 1.0 to show fully; "
           "lower it if the video degrades.\n\n"
           "Sampling is HunyuanVideo as usual: shift 7 (ModelSamplingSD3), FluxGuidance 6 (embedded "
           "guidance), cfg 1, euler / simple, 30 steps. Length 33 frames = 1.4 s at 24 fps (4k+1 frames). "
           "VAE Decode (Tiled) keeps memory down; SaveWEBM writes output/dojo/*.webm.", title="Apply and sample")
    apply = w.add("DojoApplyLoRA", strength_model=1.4, strength_clip=1.0)
    w.link(unet, "MODEL", apply, "model")
    w.link(trainer, "lora", apply, "lora")
    shift = w.add("ModelSamplingSD3", shift=7.0)
    w.link(apply, "model", shift, "model")
    pos = w.add("CLIPTextEncode", node_width=380,
                text="hvstyle, a red fox walking through fresh snow in a pine forest, morning light"
                if not clips else "hvstyle, a paper boat drifting down a rain-soaked street, slow camera pan")
    w.link(clip, "CLIP", pos, "clip")
    guidance = w.add("FluxGuidance", guidance=6.0)
    w.link(pos, "CONDITIONING", guidance, "conditioning")
    neg = w.add("ConditioningZeroOut", title="Negative (unused at cfg 1)")
    w.link(pos, "CONDITIONING", neg, "conditioning")
    preview(w, trainer, guidance, neg, vae)
    w.column()
    latent = w.add("EmptyHunyuanLatentVideo", width=848, height=480, length=33, batch_size=1)
    sampler = w.add("KSampler", seed=42, steps=30, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    w.link(shift, "MODEL", sampler, "model")
    w.link(guidance, "CONDITIONING", sampler, "positive")
    w.link(neg, "CONDITIONING", sampler, "negative")
    w.link(latent, "LATENT", sampler, "latent_image")
    decode = w.add("VAEDecodeTiled", tile_size=256, overlap=64, temporal_size=64, temporal_overlap=8)
    w.link(sampler, "LATENT", decode, "samples")
    w.link(vae, "VAE", decode, "vae")
    video = w.add("SaveWEBM", node_width=400, filename_prefix="dojo/" + name.replace("dojo_", ""), codec="vp9",
                  fps=24.0, crf=32.0)
    w.link(decode, "IMAGE", video, "images")
    save_group(w, trainer, "dojo/" + name.replace("dojo_", ""), "hvstyle", "hunyuan_video_t2v_720p_bf16.safetensors",
               "bf16")
    return w


# ------------------------------------------------------------------------------------------- Wan

WAN_NEGATIVE = "blurry, low quality, static, still picture, jpeg artifacts, deformed, extra limbs, watermark, text"


def wan_loaders(w, unets):
    """UNETLoader per file (Wan 2.2 A14B: the high-noise and the low-noise expert), umt5-xxl, Wan 2.1 VAE."""
    loaded = [w.add("UNETLoader", title=title, node_width=380, unet_name=name, weight_dtype="default")
              for title, name in unets]
    clip = w.add("CLIPLoader", node_width=380, clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan",
                 device="default")
    vae = w.add("VAELoader", node_width=380, vae_name="wan_2.1_vae.safetensors")
    return loaded, clip, vae


def wan_prompts(w, clip, text):
    pos = w.add("CLIPTextEncode", node_width=380, text=text)
    w.link(clip, "CLIP", pos, "clip")
    neg = w.add("CLIPTextEncode", node_width=380, title="Negative", text=WAN_NEGATIVE)
    w.link(clip, "CLIP", neg, "clip")
    return pos, neg


def wan_video_out(w, latent_node, vae, prefix, tiled=True):
    decode = w.add("VAEDecodeTiled", tile_size=256, overlap=64, temporal_size=64, temporal_overlap=8) if tiled \
        else w.add("VAEDecode")
    w.link(latent_node, "LATENT", decode, "samples")
    w.link(vae, "VAE", decode, "vae")
    video = w.add("SaveWEBM", node_width=400, filename_prefix=prefix, codec="vp9", fps=16.0, crf=32.0)
    w.link(decode, "IMAGE", video, "images")


def wan22_a14b_clips(comfy) -> Workflow:
    """Wan 2.2 A14B from clips: one LoRA per expert, each trained on its own noise levels, both applied at
    sampling in ComfyUI's two-KSamplerAdvanced Wan 2.2 pattern."""
    name = "dojo_wan22_video_lora_clips"
    w = Workflow(comfy, name)
    w.group("Step 1 - Load Wan 2.2 A14B")
    w.note("Wan 2.2 A14B video LoRA from clips. Wan 2.2 A14B is two networks: a high-noise expert makes "
           "the layout and motion (the noisiest steps), a low-noise expert the detail. Each gets its own LoRA, "
           "trained only on its share of the noise levels.\n\n"
           "Models (ComfyUI's repackaged Wan files):\n"
           "- models/diffusion_models/wan2.2_t2v_high_noise_14B_fp16.safetensors\n"
           "- models/diffusion_models/wan2.2_t2v_low_noise_14B_fp16.safetensors\n"
           "- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors\n"
           "- models/vae/wan_2.1_vae.safetensors\n\n"
           "Each expert is a 14B model: training one needs a ~48 GB GPU in bf16; on 24 GB set the loaders' "
           "weight_dtype to fp8_e4m3fn (the memory plan also swaps blocks to CPU when needed). The two "
           "trainers run one after the other.", title="Read me")
    (high, low), clip, vae = wan_loaders(w, [("Load high-noise expert", "wan2.2_t2v_high_noise_14B_fp16.safetensors"),
                                             ("Load low-noise expert", "wan2.2_t2v_low_noise_14B_fp16.safetensors")])
    enc = dataset_group(
        w, vae, clip,
        "Put video files (mp4, webm, mov, ...) in ComfyUI/input/wan_clips, each with a .txt caption of the "
        "same name (clip.mp4 + clip.txt). The trigger word goes in front of every caption (or where it says "
        "[trigger]).\n\nClips: frames_per_clip must be 4k+1 (Wan's VAE packs 4 frames per latent after the "
        "first): 33 frames = 2 s at Wan's 16 fps; target_fps 16 resamples every video first. clip_mode "
        "'uniform' takes clips_per_video clips spread over each video. Resolution 384 keeps 33-frame clips "
        "affordable; raise it if you have the memory.",
        folder="wan_clips", trigger_word="wanstyle", resolution=384, min_side=256, max_side=768,
        frames_per_clip=33, clip_mode="uniform", clips_per_video=2, target_fps=16.0)
    w.group("Step 3 - Train one LoRA per expert")
    w.note("Two Dojo Train LoRA nodes on the same encoded clips. The high-noise expert's LoRA trains on "
           "noise levels 0.875 .. 1 (timestep_min / timestep_max), the low-noise expert's on 0 .. 0.875: the "
           "boundary where Wan 2.2 T2V hands over from one expert to the other (musubi-tuner's and "
           "ai-toolkit's 0.875). Inside its range each keeps Wan's shifted timestep distribution.\n\n"
           "Recipe: rank 32, learning rate 1e-4 (ai-toolkit's Wan 2.2 14B value), 1000 steps each, AdamW, "
           "bf16 autocast, attention + feed-forward of every block, gradient checkpointing. Previews are off "
           "here: one expert alone does not make a finished video; Step 4 samples with both. Cancel keeps a "
           "checkpoint in output/dojo_checkpoints/<run_name>; resume_from continues it.", title="Train")
    settings = dict(steps=1000, rank=32, learning_rate=1e-4, precision="bf16", checkpoint_every=250, seed=42)
    trainers = []
    for model, title, run, lo, hi in ((high, "Train LoRA: high-noise expert", "wan22_high_noise", 0.875, 1.0),
                                      (low, "Train LoRA: low-noise expert", "wan22_low_noise", 0.0, 0.875)):
        if trainers:
            w.column()
        trainer = w.add("DojoTrainLoRA", title=title, node_width=340, run_name=run, timestep_min=lo,
                        timestep_max=hi, **settings)
        w.link(model, "MODEL", trainer, "model")
        w.link(enc, "encoded_dataset", trainer, "dataset")
        trainers.append(trainer)
    w.group("Step 4 - Try it: both LoRAs, both experts")
    w.note("ComfyUI's Wan 2.2 pattern: each expert with its own LoRA and shift 8 (ModelSamplingSD3); the "
           "first KSamplerAdvanced runs the high-noise expert for steps 0-10 of 20 and hands its leftover "
           "noise to the second, which runs the low-noise expert for steps 10-20. cfg 3.5, euler / simple. "
           "81 frames = 5 s at 16 fps (4k+1).", title="Apply and sample")
    shifted = []
    for model, trainer in ((high, trainers[0]), (low, trainers[1])):
        apply = w.add("DojoApplyLoRA", strength_model=1.0, strength_clip=1.0)
        w.link(model, "MODEL", apply, "model")
        w.link(trainer, "lora", apply, "lora")
        shift = w.add("ModelSamplingSD3", shift=8.0)
        w.link(apply, "model", shift, "model")
        shifted.append(shift)
    pos, neg = wan_prompts(w, clip, "wanstyle, a paper boat drifting down a rain-soaked street, slow camera pan")
    w.column()
    latent = w.add("EmptyHunyuanLatentVideo", width=640, height=640, length=81, batch_size=1)
    first = w.add("KSamplerAdvanced", title="KSampler (high-noise expert)", add_noise="enable", noise_seed=42,
                  steps=20, cfg=3.5, sampler_name="euler", scheduler="simple", start_at_step=0, end_at_step=10,
                  return_with_leftover_noise="enable")
    second = w.add("KSamplerAdvanced", title="KSampler (low-noise expert)", add_noise="disable", noise_seed=42,
                   steps=20, cfg=3.5, sampler_name="euler", scheduler="simple", start_at_step=10, end_at_step=10000,
                   return_with_leftover_noise="disable")
    for sampler, model in ((first, shifted[0]), (second, shifted[1])):
        w.link(model, "MODEL", sampler, "model")
        w.link(pos, "CONDITIONING", sampler, "positive")
        w.link(neg, "CONDITIONING", sampler, "negative")
    w.link(latent, "LATENT", first, "latent_image")
    w.link(first, "LATENT", second, "latent_image")
    wan_video_out(w, second, vae, "dojo/" + name.replace("dojo_", ""))
    w.group("Step 5 - Save the LoRAs")
    w.note("Two files, one per expert (models/loras/dojo/wan22_high_noise_*.safetensors and "
           "wan22_low_noise_*), in the layout ComfyUI's LoraLoaderModelOnly, diffusers and musubi-tuner read "
           "(diffusion_model.blocks.N....lora_A / lora_B). Their metadata records the noise range each trained "
           "on. Load each onto its own expert, as in Step 4.", title="Save")
    for trainer, run, base in ((trainers[0], "wan22_high_noise", "wan2.2_t2v_high_noise_14B_fp16.safetensors"),
                               (trainers[1], "wan22_low_noise", "wan2.2_t2v_low_noise_14B_fp16.safetensors")):
        saver = w.add("DojoSaveLoRA", node_width=340, filename_prefix="dojo/" + run, save_dtype="bf16",
                      trigger_word="wanstyle", base_model_name=base)
        w.link(trainer, "lora", saver, "lora")
    return w


def wan_images(comfy) -> Workflow:
    """Wan 2.1 T2V 1.3B LoRA from captioned images (one-frame videos), sampled as a video."""
    name = "dojo_wan_lora_images"
    w = Workflow(comfy, name)
    w.group("Step 1 - Load Wan 2.1")
    w.note("Wan LoRA from captioned images, on Wan 2.1 T2V 1.3B (a 14B Wan 2.1 or a Wan 2.2 A14B expert "
           "trains the same way: change the file).\n\n"
           "Models (ComfyUI's repackaged Wan files):\n"
           "- models/diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors\n"
           "- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors\n"
           "- models/vae/wan_2.1_vae.safetensors\n\n"
           "The 1.3B model trains on images in ~12 GB of GPU memory (bf16, gradient checkpointing).",
           title="Read me")
    (unet,), clip, vae = wan_loaders(w, [("Load Wan 2.1 T2V 1.3B", "wan2.1_t2v_1.3B_bf16.safetensors")])
    enc = dataset_group(
        w, vae, clip,
        "Put your images in ComfyUI/input/wan_images, each with a .txt caption of the same name. The "
        "trigger word (wanstyle) goes in front of every caption, or where a caption says [trigger].\n\n"
        "Images train Wan as one-frame videos (frames_per_clip 1): the style or subject carries over to "
        "generated videos. Buckets of about 512 x 512 pixels, any aspect ratio.",
        folder="wan_images", trigger_word="wanstyle", resolution=512, min_side=256, max_side=1024)
    trainer = train_group(
        w, unet, enc,
        "The Wan recipe (musubi-tuner's): rank 32, learning rate 2e-4 (0 = these family defaults), 1000 "
        "steps, AdamW, batch 1, bf16 autocast. Flow-matching objective; 'auto' timesteps sample with "
        "musubi-tuner's training shift 3 (Wan samples at 8). Training adapts the attention and feed-forward "
        "layers of every block ('auto').\n\nEvery 250 steps the node previews the Step 4 prompt as a 5-frame "
        "video, saved as samples/step_NNNNNN.webp. Cancel keeps a checkpoint in "
        "output/dojo_checkpoints/<run_name>; resume_from continues it.",
        dict(steps=1000, rank=32, learning_rate=2e-4, precision="bf16", checkpoint_every=250, seed=42,
             sample_frames=5), name.replace("dojo_", ""))
    w.group("Step 4 - Try it: apply and make a video")
    w.note("Dojo Apply LoRA, then Wan 2.1 sampling as in ComfyUI's template: shift 8 (ModelSamplingSD3), "
           "cfg 6, uni_pc / simple, 30 steps. 33 frames = 2 s at 16 fps (4k+1).", title="Apply and sample")
    apply = w.add("DojoApplyLoRA", strength_model=1.0, strength_clip=1.0)
    w.link(unet, "MODEL", apply, "model")
    w.link(trainer, "lora", apply, "lora")
    shift = w.add("ModelSamplingSD3", shift=8.0)
    w.link(apply, "model", shift, "model")
    pos, neg = wan_prompts(w, clip, "wanstyle, a red fox walking through fresh snow in a pine forest, morning light")
    preview(w, trainer, pos, neg, vae)
    w.column()
    latent = w.add("EmptyHunyuanLatentVideo", width=832, height=480, length=33, batch_size=1)
    sampler = w.add("KSampler", seed=42, steps=30, cfg=6.0, sampler_name="uni_pc", scheduler="simple", denoise=1.0)
    w.link(shift, "MODEL", sampler, "model")
    w.link(pos, "CONDITIONING", sampler, "positive")
    w.link(neg, "CONDITIONING", sampler, "negative")
    w.link(latent, "LATENT", sampler, "latent_image")
    wan_video_out(w, sampler, vae, "dojo/" + name.replace("dojo_", ""))
    save_group(w, trainer, "dojo/" + name.replace("dojo_", ""), "wanstyle", "wan2.1_t2v_1.3B_bf16.safetensors", "bf16")
    return w


# ------------------------------------------------------------------------------ Qwen-Image, Z-Image

QWEN_FAMILIES = {
    # Per workflow: the model files and loader type, the dataset folder and trigger word, the recipe and
    # ComfyUI's own sampling settings for the family (its templates').
    "dojo_qwen_image_lora": dict(
        label="Qwen-Image", unet="qwen_image_bf16.safetensors", te="qwen_2.5_vl_7b_fp8_scaled.safetensors",
        te_type="qwen_image", vae="qwen_image_vae.safetensors", folder="qwen_image_style", trigger="qwnstyle",
        memory="Training needs the bf16 model (20 B parameters, 41 GB): a 48 GB GPU, or blocks_to_swap on "
               "Train LoRA to stream blocks from system memory (64 GB+ RAM). The fp8 text encoder only "
               "encodes the captions once.",
        recipe="The Qwen-Image recipe (musubi-tuner's): rank 16, learning rate 5e-5, 1200 steps, AdamW, batch 1, "
               "bf16 autocast, gradient checkpointing. Flow-matching objective; 'auto' timesteps sample with "
               "the model's own shift. Training adapts attention + MLP of every transformer block ('auto').",
        train=dict(steps=1200, rank=16, learning_rate=5e-5),
        sampling="Sampling is Qwen-Image as in ComfyUI's template: ModelSamplingAuraFlow shift 3.1, cfg 2.5, "
                 "euler / simple, 20 steps, 1328 x 1328.",
        shift=3.1, steps=20, cfg=2.5, sampler="euler", size=1328, negative=" ",
        prompt="qwnstyle, a lighthouse on a rocky coast at dawn, gulls over the waves"),
    "dojo_z_image_lora": dict(
        label="Z-Image Turbo", unet="z_image_turbo_bf16.safetensors", te="qwen_3_4b.safetensors",
        te_type="lumina2", vae="ae.safetensors", folder="z_image_subject", trigger="zmgsubject",
        memory="Training needs the bf16 model (6 B parameters, 12 GB): ~24 GB of GPU memory at rank 16 with "
               "gradient checkpointing (on by default).",
        recipe="The Z-Image recipe (ai-toolkit's): rank 16, learning rate 1e-4, 1000 steps, AdamW, batch 1, "
               "bf16 autocast, gradient checkpointing. Flow-matching objective; 'auto' timesteps sample with "
               "the model's shift 3. Training adapts attention + MLP of every block, the refiners included.\n\n"
               "Z-Image Turbo is step-distilled: a LoRA trained straight on it works at low step counts but "
               "slowly wears the distillation away on long runs; keep runs short or lower the learning rate.",
        train=dict(steps=1000, rank=16, learning_rate=1e-4),
        sampling="Sampling is Z-Image Turbo as in ComfyUI's template: ModelSamplingAuraFlow shift 3, cfg 1 "
                 "(distilled, the negative is unused), res_multistep / simple, 9 steps, 1024 x 1024.",
        shift=3.0, steps=9, cfg=1.0, sampler="res_multistep", size=1024, negative="",
        prompt="zmgsubject, portrait photo in a sunlit greenhouse, shallow depth of field"),
}


def qwen_family_lora(comfy, name: str) -> Workflow:
    f = QWEN_FAMILIES[name]
    run = name.replace("dojo_", "")
    w = Workflow(comfy, name)
    w.group(f"Step 1 - Load {f['label']}")
    w.note(f"{f['label']} LoRA from captioned images.\n\n"
           "Models (ComfyUI's repackaged files):\n"
           f"- models/diffusion_models/{f['unet']}\n"
           f"- models/text_encoders/{f['te']}\n"
           f"- models/vae/{f['vae']}\n\n" + f["memory"], title="Read me")
    unet = w.add("UNETLoader", node_width=340, unet_name=f["unet"], weight_dtype="default")
    clip = w.add("CLIPLoader", node_width=340, clip_name=f["te"], type=f["te_type"], device="default")
    vae = w.add("VAELoader", node_width=340, vae_name=f["vae"])
    enc = dataset_group(
        w, vae, clip,
        f"Put 10-40 images in ComfyUI/input/{f['folder']}, each with a .txt caption of the same name. The "
        f"trigger word ({f['trigger']}) goes in front of every caption, or where a caption says [trigger].\n\n"
        "Dojo Encode Dataset encodes every image once with the VAE and every caption once with the text "
        "encoder (its chat template and attention mask, as in sampling); captions of different lengths "
        "train in separate batches, never padded together.",
        folder=f["folder"], trigger_word=f["trigger"], resolution=1024, min_side=512, max_side=1536)
    trainer = train_group(
        w, unet, enc,
        f["recipe"] + "\n\nEvery 250 steps the node previews the Step 4 prompt. Cancel keeps a checkpoint in "
        "output/dojo_checkpoints/<run_name>; resume_from continues it.",
        dict(f["train"], precision="bf16", checkpoint_every=250, seed=42), run)
    w.group("Step 4 - Try it: apply and sample")
    w.note("Dojo Apply LoRA patches a copy of the model (the loaded one is untouched): strength_model is the "
           "slider, 1.0 as trained, 0 = off.\n\n" + f["sampling"], title="Apply and sample")
    apply = w.add("DojoApplyLoRA", strength_model=1.0, strength_clip=1.0)
    w.link(unet, "MODEL", apply, "model")
    w.link(trainer, "lora", apply, "lora")
    shift = w.add("ModelSamplingAuraFlow", shift=f["shift"])
    w.link(apply, "model", shift, "model")
    pos = w.add("CLIPTextEncode", node_width=380, text=f["prompt"])
    w.link(clip, "CLIP", pos, "clip")
    if f["cfg"] == 1.0:
        neg = w.add("ConditioningZeroOut", title="Negative (unused at cfg 1)")
        w.link(pos, "CONDITIONING", neg, "conditioning")
    else:
        neg = w.add("CLIPTextEncode", node_width=380, title="Negative", text=f["negative"])
        w.link(clip, "CLIP", neg, "clip")
    preview(w, trainer, pos, neg, vae)
    w.column()
    latent = w.add("EmptySD3LatentImage", width=f["size"], height=f["size"], batch_size=1)
    sampler = w.add("KSampler", seed=42, steps=f["steps"], cfg=f["cfg"], sampler_name=f["sampler"],
                    scheduler="simple", denoise=1.0)
    w.link(shift, "MODEL", sampler, "model")
    w.link(pos, "CONDITIONING", sampler, "positive")
    w.link(neg, "CONDITIONING", sampler, "negative")
    w.link(latent, "LATENT", sampler, "latent_image")
    decode = w.add("VAEDecode")
    w.link(sampler, "LATENT", decode, "samples")
    w.link(vae, "VAE", decode, "vae")
    image = w.add("SaveImage", node_width=400, filename_prefix="dojo/" + run)
    w.link(decode, "IMAGE", image, "images")
    save_group(w, trainer, "dojo/" + run, f["trigger"], f["unet"], "bf16")
    return w


WORKFLOWS = {
    "dojo_flux_lora_trigger_word": flux_lora,
    "dojo_sdxl_lora_captions": sdxl_lora,
    "dojo_sdxl_pivotal_tuning": sdxl_pivotal,
    "dojo_sd15_textual_inversion": sd15_textual_inversion,
    "dojo_hunyuan_video_lora_images": lambda c: hunyuan_lora(c, clips=False),
    "dojo_hunyuan_video_lora_clips": lambda c: hunyuan_lora(c, clips=True),
    "dojo_wan22_video_lora_clips": wan22_a14b_clips,
    "dojo_wan_lora_images": wan_images,
    "dojo_qwen_image_lora": lambda c: qwen_family_lora(c, "dojo_qwen_image_lora"),
    "dojo_z_image_lora": lambda c: qwen_family_lora(c, "dojo_z_image_lora"),
}


# ------------------------------------------------------------------------------------- thumbnail

def thumbnail(workflow: dict, path: Path, size=(640, 360)):
    """The graph's layout drawn as boxes (groups, nodes) and link lines, in the frontend's colours."""
    from PIL import Image, ImageDraw
    xs = [g["bounding"][0] for g in workflow["groups"]] + [g["bounding"][0] + g["bounding"][2] for g in workflow["groups"]]
    ys = [g["bounding"][1] for g in workflow["groups"]] + [g["bounding"][1] + g["bounding"][3] for g in workflow["groups"]]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    pad = 16
    scale = min((size[0] - 2 * pad) / (x1 - x0), (size[1] - 2 * pad - 24) / (y1 - y0))
    img = Image.new("RGB", size, (32, 32, 36))
    d = ImageDraw.Draw(img)

    def p(x, y):
        return (pad + (x - x0) * scale, pad + 24 + (y - y0) * scale)

    d.text((pad, 8), workflow_title(path.stem), fill=(230, 230, 230))
    for g in workflow["groups"]:
        gx, gy, gw, gh = g["bounding"]
        d.rectangle([p(gx, gy), p(gx + gw, gy + gh)], fill=(45, 70, 95), outline=(63, 120, 158), width=2)
        d.text((p(gx, gy)[0] + 4, p(gx, gy)[1] + 2), g["title"].split(" - ")[0], fill=(220, 230, 240))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for n in workflow["nodes"]:
        nx, ny = n["pos"]
        w_, h_ = n["size"]
        dojo = n["type"].startswith("Dojo")
        fill = (101, 83, 51) if n["type"] == "Note" else (120, 60, 140) if dojo else (60, 60, 64)
        d.rectangle([p(nx, ny - TITLE_H), p(nx + w_, ny + h_)], fill=fill, outline=(20, 20, 20))
        if n["type"] != "Note" and w_ * scale > 60:
            label = n["type"].replace("Dojo", "Dojo ")[: int(w_ * scale / 6)]
            d.text((p(nx, ny - TITLE_H)[0] + 3, p(nx, ny - TITLE_H)[1] + 1), label, fill=(235, 235, 235))
    for _, a, sa, b, sb, _ in workflow["links"]:
        na, nb = nodes[a], nodes[b]
        start = p(na["pos"][0] + na["size"][0], na["pos"][1] + 12 + 24 * sa)
        end = p(nb["pos"][0], nb["pos"][1] + 12 + 24 * sb)
        d.line([start, end], fill=(170, 200, 120), width=2)
    img.save(path, quality=90)


def workflow_title(name: str) -> str:
    return {"dojo_flux_lora_trigger_word": "Dojo: Flux.1 LoRA from images + trigger word",
            "dojo_sdxl_lora_captions": "Dojo: SDXL LoRA from captioned images",
            "dojo_sdxl_pivotal_tuning": "Dojo: SDXL pivotal tuning (LoRA + trigger-word embedding)",
            "dojo_sd15_textual_inversion": "Dojo: SD1.5 textual inversion, used with weights",
            "dojo_hunyuan_video_lora_images": "Dojo: HunyuanVideo LoRA from captioned images",
            "dojo_hunyuan_video_lora_clips": "Dojo: HunyuanVideo LoRA from video clips",
            "dojo_wan22_video_lora_clips": "Dojo: Wan 2.2 A14B video LoRA (both experts) from clips",
            "dojo_wan_lora_images": "Dojo: Wan 2.1 / 2.2 LoRA from captioned images",
            "dojo_qwen_image_lora": "Dojo: Qwen-Image LoRA from captioned images",
            "dojo_z_image_lora": "Dojo: Z-Image Turbo LoRA from captioned images"}[name]


def main():
    from comfy_harness import ComfyUI, comfyui_path, make_base_directory
    comfy = ComfyUI(comfyui_path(), make_base_directory(Path(tempfile.mkdtemp(prefix="dojo_wf_"))))
    for name, build in WORKFLOWS.items():
        data = build(comfy).to_json()
        out = HERE / f"{name}.json"
        out.write_text(json.dumps(data, indent=1) + "\n")
        thumbnail(data, HERE / f"{name}.jpg")
        print("wrote", out)


if __name__ == "__main__":
    main()
