"""Sharing adapters: read any adapter file's metadata, export a Hugging Face-ready folder with a model
card, and publish that folder to the Hub."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..training.files import next_free_path, save_safetensors_new, write_new_file, write_new_folder
from ..training.hub import PublishError, publish_allowed, publish_disabled_message, publish_folder
from ..training.model_card import LICENSES, CardInput, model_card
from ..training.sharing import WORKFLOW_KEY, describe_metadata, scrub, sharing_metadata
from . import comfy_compat as cc
from .comfy_compat import io
from .paths import check_name_text, resolve_inside

log = logging.getLogger("comfyui-dojo")
NONE = "none"
EXPORT_FOLDER = "dojo_exports"


def read_header(path: Path) -> tuple[dict | None, int | None, str | None]:
    """(metadata, tensor count, problem) from a file's safetensors header only; never raises."""
    if path.suffix != ".safetensors":
        return None, None, (f"{path.suffix or 'no extension'} file: only .safetensors files carry readable "
                            "metadata (other formats would need unpickling)")
    try:
        import safetensors
        with safetensors.safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {}), len(list(f.keys())), None
    except Exception as e:  # noqa: BLE001
        return None, None, f"the safetensors header cannot be read ({type(e).__name__}); is the file complete?"


def adapter_report(name: str, full: str | None, kind: str) -> str:
    if full is None:
        return f"{name}: no such file in models/{kind}"
    metadata, count, problem = read_header(Path(full))
    if problem:
        return f"{name}\n{problem}"
    return describe_metadata(name, metadata, count)


def exports_root() -> Path:
    return Path(cc.output_directory()) / EXPORT_FOLDER


def export_folder_names() -> list[str]:
    root = exports_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._") or "dojo_lora"


class DojoAdapterInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoAdapterInfo",
            display_name="Dojo Adapter Info",
            category="Dojo/share",
            is_output_node=True,
            description="Shows the metadata of a LoRA or embedding file readably: Dojo's training settings and "
                        "graph, and other trainers' kohya ss_* keys (rank, alpha, base model, steps, tags). "
                        "Files without metadata are reported as such.",
            inputs=[
                io.Combo.Input("lora_name", options=[NONE] + cc.lora_file_names(), default=NONE,
                               tooltip="A file in models/loras to describe (none = skip)."),
                io.Combo.Input("embedding_name", options=[NONE] + cc.embedding_file_names(), default=NONE,
                               optional=True, tooltip="A file in models/embeddings to describe (none = skip)."),
            ],
            outputs=[io.String.Output(display_name="info", tooltip="The readable report.")],
        )

    @classmethod
    def execute(cls, lora_name, embedding_name=NONE) -> io.NodeOutput:
        parts = []
        if lora_name and lora_name != NONE:
            parts.append(adapter_report(lora_name, cc.lora_file_path(lora_name), "loras"))
        if embedding_name and embedding_name != NONE:
            parts.append(adapter_report(embedding_name, cc.embedding_file_path(embedding_name), "embeddings"))
        text = "\n\n".join(parts) or "Pick a file in lora_name or embedding_name."
        return io.NodeOutput(text, ui={"text": [text]})


def save_samples(images: torch.Tensor, folder: Path, animate_over: int, fps: float) -> list[str]:
    """IMAGE [B, H, W, C] -> samples/sample_NN.png, or one animated samples/sample.webp for more than
    `animate_over` frames. Returns paths relative to `folder`."""
    from PIL import Image
    frames = [Image.fromarray(np.clip(255.0 * img.cpu().float().numpy(), 0, 255).astype(np.uint8))
              for img in images]
    target = folder / "samples"
    if animate_over and len(frames) > animate_over:
        path = target / "sample.webp"
        write_new_file(path, lambda tmp: frames[0].save(tmp, format="WEBP", save_all=True, append_images=frames[1:],
                                                          duration=int(1000 / max(fps, 0.1)), loop=0, lossless=False,
                                                          quality=90))
        return ["samples/sample.webp"]
    out = []
    for i, frame in enumerate(frames):
        path = target / f"sample_{i:02d}.png"
        write_new_file(path, lambda tmp, f=frame: f.save(tmp, format="PNG"))
        out.append(f"samples/{path.name}")
    return out


def write_text(path: Path, text: str) -> None:
    write_new_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class DojoExportModelCard(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoExportModelCard",
            display_name="Dojo Export Model Card",
            category="Dojo/share",
            is_output_node=True,
            description="Writes a Hugging Face-ready folder in output/dojo_exports/<name>_NNNNN (never overwriting "
                        "one): the LoRA file, a README.md model card (base model, trigger word, license, usage in "
                        "ComfyUI and diffusers, training settings), sample images and the training workflow.",
            inputs=[
                io.String.Input("name", default="my_lora",
                                tooltip="Name of the export folder and of the LoRA file in it."),
                io.Combo.Input("license", options=LICENSES, default="other",
                               tooltip="License in the model card; it must agree with the base model's license "
                                       "(Flux.1-dev: flux-1-dev-non-commercial-license)."),
                io.Float.Input("strength", default=1.0, min=-20.0, max=20.0, step=0.05,
                               tooltip="The LoRA strength the model card recommends."),
                io.LoraModel.Input("lora", optional=True,
                                   tooltip="A LoRA from the graph (Dojo Train LoRA / Load LoRA); saved into the "
                                           "export in fp16 with its metadata. Takes precedence over lora_name."),
                io.Combo.Input("lora_name", options=[NONE] + cc.lora_file_names(), default=NONE, optional=True,
                               tooltip="Or a file from models/loras, copied as it is."),
                io.Image.Input("samples", optional=True,
                               tooltip="Sample images (or video frames) made with the LoRA, shown in the card."),
                io.Int.Input("animate_over", default=8, min=0, max=10_000, optional=True,
                             tooltip="More sample frames than this become one animated webp (0 = always PNGs)."),
                io.Float.Input("fps", default=24.0, min=0.1, max=240.0, step=0.1, optional=True,
                               tooltip="Frame rate of the animated webp."),
                io.String.Input("trigger_word", default="", optional=True,
                                tooltip="instance_prompt in the card; empty = the trigger word in the metadata."),
                io.String.Input("base_model_repo", default="", optional=True,
                                tooltip="Hugging Face id of the base model (e.g. black-forest-labs/FLUX.1-dev); "
                                        "empty = the family's usual base."),
            ],
            hidden=cc.GRAPH_HIDDEN_INPUTS,
            outputs=[io.String.Output(display_name="export",
                                      tooltip="The export folder's name in output/dojo_exports (for Publish).")],
        )

    @classmethod
    def execute(cls, name, license, strength, lora=None, lora_name=NONE, samples=None, animate_over=8, fps=24.0,
                trigger_word="", base_model_repo="") -> io.NodeOutput:
        check_name_text(name or "", "name")
        stem = safe_name(name)
        prompt, extra = cc.hidden_graph(cls)
        source = None
        if lora is None:
            if not lora_name or lora_name == NONE:
                raise ValueError("connect a LORA or pick a lora_name to export")
            full = cc.lora_file_path(lora_name)
            if full is None:
                raise FileNotFoundError(f"no LoRA named '{lora_name}' in models/loras")
            source = Path(full)
        root = exports_root()
        folder = next_free_path(root, stem, "")

        def fill(folder: Path) -> None:  # written into a temporary folder, renamed into place when complete
            adapter_file = f"{stem}.safetensors" if source is None else safe_name(source.name)
            if source is None:
                metadata = sharing_metadata("lora", {**getattr(lora, "metadata", {}), "dojo_version": __version__},
                                            prompt, extra)
                save_safetensors_new(folder / adapter_file, {k: v.to(torch.float16) for k, v in lora.items()}, metadata)
            else:
                write_new_file(folder / adapter_file, lambda tmp: shutil.copyfile(source, tmp),
                               size_hint=source.stat().st_size)
                metadata = read_header(source)[0] or {}
            sample_files = save_samples(samples, folder, animate_over, fps) if samples is not None else []
            workflow = (extra or {}).get(WORKFLOW_KEY) if isinstance(extra, dict) else None
            if workflow is None and metadata.get(WORKFLOW_KEY):
                try:
                    workflow = json.loads(metadata[WORKFLOW_KEY])
                except ValueError:
                    workflow = None
            workflow_file = None
            if isinstance(workflow, dict):
                workflow_file = "workflow.json"
                write_text(folder / workflow_file, json.dumps(scrub(workflow), indent=1))
            card = CardInput(name=stem, adapter_file=adapter_file, metadata=metadata, license=license,
                             strength=float(strength),
                             trigger_word=(trigger_word or "").strip() or metadata.get("dojo_trigger_word", ""),
                             base_model=(base_model_repo or "").strip(), samples=sample_files,
                             workflow_file=workflow_file)
            write_text(folder / "README.md", model_card(card))

        write_new_folder(folder, fill)
        log.info("Dojo: model card export written to %s", folder)
        return io.NodeOutput(folder.name, ui={"text": [f"{EXPORT_FOLDER}/{folder.name}"]})


class DojoPublishToHub(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoPublishToHub",
            display_name="Dojo Publish To Hub",
            category="Dojo/share",
            is_output_node=True,
            description="Uploads an export folder (from Dojo Export Model Card) to a Hugging Face model repository. "
                        "The token comes from HF_TOKEN or your `hf auth login`, never from the graph. Needs the "
                        "huggingface_hub package. Off until the server owner allows it: DOJO_ALLOW_PUBLISH=1 "
                        "or {\"allow_publish\": true} in ComfyUI's user/comfyui-dojo.json.",
            inputs=[
                io.String.Input("repo_id", default="your-name/my-lora",
                                tooltip="The Hugging Face repository: user-or-organisation/model-name; created if "
                                        "it does not exist."),
                io.Boolean.Input("private", default=True,
                                 tooltip="Create the repository as private (only when it is created)."),
                io.Combo.Input("export_folder", options=[NONE] + export_folder_names(), default=NONE, optional=True,
                               tooltip="A folder in output/dojo_exports (refresh the page to see new ones)."),
                io.String.Input("export", default="", optional=True, force_input=True,
                                tooltip="The export output of Dojo Export Model Card (overrides export_folder)."),
                io.String.Input("commit_message", default="", optional=True,
                                tooltip="Commit message on the Hub; empty = a default one."),
            ],
            outputs=[io.String.Output(display_name="url", tooltip="The repository's address.")],
        )

    @classmethod
    def execute(cls, repo_id, private, export_folder=NONE, export="", commit_message="") -> io.NodeOutput:
        if not publish_allowed(cc.user_directory()):
            raise PublishError(publish_disabled_message(cc.user_directory()))
        chosen = (export or "").strip() or (export_folder if export_folder != NONE else "")
        if not chosen:
            raise ValueError("choose an export_folder or connect the export output of Dojo Export Model Card")
        chosen = chosen.replace("\\", "/")
        if chosen.startswith(EXPORT_FOLDER + "/"):
            chosen = chosen[len(EXPORT_FOLDER) + 1:]
        folder = resolve_inside(exports_root(), chosen, "export")
        if not folder.is_dir():
            raise FileNotFoundError(f"no export folder '{chosen}' in output/{EXPORT_FOLDER}")
        try:
            url = publish_folder(folder, repo_id, bool(private), commit_message)
        except PublishError as e:
            log.error("Dojo: %s", e)
            raise
        log.info("Dojo: published %s to %s", folder.name, url)
        return io.NodeOutput(url, ui={"text": [url]})
