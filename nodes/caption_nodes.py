"""Captions from the graph: list the dataset's images for any captioning node, set captions from its
output (by order or by file name) with edits, write captions back as .txt files, and an optional
built-in captioner that runs a local transformers model from models/captioners."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..training.datasets.graph_captions import (CaptionEdits, captions_by_name, captions_by_order, edit_captions,
                                               item_names, parse_caption_mapping, write_captions)
from ..training.datasets.preview import tensor_to_pil
from ..training.files import next_free_path
from . import comfy_compat as cc
from .comfy_compat import io
from .dataset_nodes import preview_sheet
from .types import DatasetType

log = logging.getLogger("comfyui-dojo")


def _first(value):
    """With is_input_list every input arrives as a list; widgets carry one value."""
    return value[0] if isinstance(value, list) else value


def item_image(item) -> torch.Tensor:
    """An item's first frame as ComfyUI IMAGE [1, H, W, 3] in [0, 1]."""
    return ((item.load()[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1)[None].float()


class DojoDatasetImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoDatasetImages",
            display_name="Dojo Dataset Images",
            category="Dojo/captions",
            description="Lists the dataset's items in order (one image each; a clip gives its first frame) with "
                        "their file names, so any captioning node can caption them for Dojo Set Captions.",
            inputs=[DatasetType.Input("dataset", tooltip="From Dojo Load Image Dataset.")],
            outputs=[
                io.Image.Output(display_name="images", is_output_list=True, tooltip="One image per item, in order."),
                io.String.Output(display_name="file_names", is_output_list=True,
                                 tooltip="Each item's file name relative to the dataset folder."),
                io.Int.Output(display_name="count", tooltip="How many items."),
            ],
        )

    @classmethod
    def execute(cls, dataset) -> io.NodeOutput:
        return io.NodeOutput([item_image(i) for i in dataset.items], item_names(dataset), len(dataset.items))


class DojoSetCaptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoSetCaptions",
            display_name="Dojo Set Captions",
            category="Dojo/captions",
            is_input_list=True,
            description="Gives the dataset captions from the graph (overriding .txt files per item) and edits "
                        "every caption; the trigger word, [trigger], dropout and shuffling then apply as usual.",
            inputs=[
                DatasetType.Input("dataset", tooltip="From Dojo Load Image Dataset."),
                io.Combo.Input("match", options=["order", "file name"], default="order",
                               tooltip="order: caption i is item i (a list from a captioning node, or one caption "
                                       "per line). file name: lines 'name.png: caption'."),
                io.String.Input("captions", multiline=True, default="", optional=True,
                                tooltip="Captions from a captioning node (a list), or typed text; empty = keep the "
                                        ".txt captions and only apply the edits."),
                io.String.Input("prefix", default="", optional=True, tooltip="Put in front of every caption."),
                io.String.Input("suffix", default="", optional=True, tooltip="Put at the end of every caption."),
                io.String.Input("find", default="", optional=True, tooltip="Text to replace in every caption."),
                io.String.Input("replace", default="", optional=True, tooltip="What 'find' is replaced with."),
            ],
            outputs=[DatasetType.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, dataset, match, captions=None, prefix=None, suffix=None, find=None, replace=None) -> io.NodeOutput:
        dataset, match = _first(dataset), _first(match)
        texts = [c for c in (captions or []) if c is not None]
        if len(texts) == 1 and len(dataset.items) > 1 and match == "order":
            texts = [line for line in texts[0].splitlines() if line.strip()]  # typed: one caption per line
        if match == "file name" and texts:
            dataset = captions_by_name(dataset, parse_caption_mapping("\n".join(texts)))
        elif texts and any(t.strip() for t in texts):
            dataset = captions_by_order(dataset, texts)
        edits = CaptionEdits(*(str(_first(v) or "") for v in (prefix, suffix, find, replace)))
        if edits != CaptionEdits():
            dataset = edit_captions(dataset, edits)
        text = f"{len(dataset.items)} items captioned"
        return io.NodeOutput(dataset, ui=cc.preview_ui(preview_sheet(dataset), text))


class DojoWriteCaptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoWriteCaptions",
            display_name="Dojo Write Captions",
            category="Dojo/captions",
            is_output_node=True,
            description="Writes the dataset's captions as .txt files beside its images so you can review and "
                        "edit them; existing .txt files are kept unless you allow overwriting. A folder Dojo may "
                        "not write to is copied into output/dojo_datasets with the captions.",
            inputs=[
                DatasetType.Input("dataset", tooltip="A captioned dataset (e.g. from Dojo Set Captions)."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace existing .txt caption files (each old one is kept as name.txt.bak)."),
                io.Boolean.Input("write_to_copy", default=False,
                                 tooltip="Copy the dataset into output/dojo_datasets and write there instead."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="What was written where.")],
        )

    @classmethod
    def execute(cls, dataset, overwrite, write_to_copy) -> io.NodeOutput:
        copy_to = None
        if write_to_copy or not _writable(dataset.root):
            copy_to = next_free_path(Path(cc.output_directory()) / "dojo_datasets", dataset.root.name, "")
        report = write_captions(dataset, overwrite, copy_to)
        where = f"a copy in {copy_to}" if report.copied else f"{dataset.root.name}/"
        text = (f"wrote {len(report.written)} caption files to {where}; kept {len(report.kept)} existing "
                f"(overwrite is off)" if report.kept else f"wrote {len(report.written)} caption files to {where}")
        if report.backups:
            text += f"; the {len(report.backups)} replaced caption files are kept as .txt.bak beside them"
        log.info("Dojo: %s", text)
        return io.NodeOutput(text, ui={"text": [text]})


def _writable(folder: Path) -> bool:
    import os
    return os.access(folder, os.W_OK)


class MissingCaptioner(FileNotFoundError):
    pass


def run_captioner(folder: str, images: list, prompt: str, max_new_tokens: int, batch_size: int, device,
                  on_batch=None) -> list[str]:
    """Caption PIL images with a local transformers image-to-text model (never downloads, never runs
    remote code)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).to(device).eval()
    captions = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            kwargs = {"images": chunk, "return_tensors": "pt"}
            if prompt:
                kwargs["text"] = [prompt] * len(chunk)
            inputs = processor(**kwargs).to(device)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens)
            texts = processor.batch_decode(out, skip_special_tokens=True)
            captions += [t[len(prompt):].strip() if prompt and t.startswith(prompt) else t.strip() for t in texts]
            if on_batch is not None:
                on_batch(len(captions))
    return captions


class DojoCaptionImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoCaptionImages",
            display_name="Dojo Caption Images",
            category="Dojo/captions",
            description="Captions the dataset with a local image-to-text model (a transformers folder such as "
                        "BLIP in models/captioners/<name>); nothing is downloaded.",
            inputs=[
                DatasetType.Input("dataset", tooltip="From Dojo Load Image Dataset."),
                io.Combo.Input("captioner", options=cc.captioner_folders() or ["(none found)"],
                               tooltip="A model folder in models/captioners (with config.json, weights, processor)."),
                io.String.Input("prompt", default="", tooltip="Optional text the caption continues (e.g. 'a photo of')."),
                io.Int.Input("max_new_tokens", default=40, min=1, max=512, tooltip="Longest caption, in tokens."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Images captioned at once."),
            ],
            outputs=[DatasetType.Output(display_name="dataset"),
                     io.String.Output(display_name="captions", is_output_list=True, tooltip="One per item.")],
        )

    @classmethod
    def execute(cls, dataset, captioner, prompt, max_new_tokens, batch_size) -> io.NodeOutput:
        folder = cc.captioner_path(captioner)
        if folder is None:
            raise MissingCaptioner(
                f"no captioning model '{captioner}' in models/captioners. Put a transformers image-to-text model "
                "folder there (for example a BLIP captioning model: config.json, model.safetensors and its processor "
                "files, as saved by save_pretrained) and pick it here; Dojo never downloads models.")
        images = [tensor_to_pil(item.load()[0]) for item in dataset.items]
        progress = cc.progress_bar(len(images))
        captions = run_captioner(folder, images, prompt, max_new_tokens, batch_size, cc.torch_device(),
                                 on_batch=lambda done: progress.update_absolute(done, len(images)))
        return io.NodeOutput(captions_by_order(dataset, captions), captions)
