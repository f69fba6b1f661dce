"""Using and keeping a LoRA: apply with strength sliders, save into models/loras, load a file."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .. import __version__
from ..training.file_metadata import for_file
from ..training.files import next_free_path, save_safetensors_new
from ..training.lora_formats import check_lora_tensors
from ..training.protocol import Family
from ..training.sharing import sharing_metadata
from ..training.textual_inversion import bundle_tensors, split_bundle
from . import comfy_compat as cc
from .comfy_compat import io
from .failures import out_of_memory_as
from .embedding_nodes import save_embedding
from .lora_training import DojoLoRA
from .paths import resolve_inside
from .te_lora import TE_KEY_PREFIX

log = logging.getLogger("comfyui-dojo")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LoraDoesNotFit(ValueError):
    pass


def apply_checked(model, clip, lora: dict, strength_model: float, strength_clip: float):
    """Apply through ComfyUI's own LoRA path; refuse (applying nothing) if any key fits no layer."""
    check_lora_tensors(dict(lora), "Dojo Apply LoRA")
    metadata = getattr(lora, "metadata", {})
    family = metadata.get("dojo_family")
    if family and model is not None:
        try:
            model_family = cc.model_family(model).value
        except cc.UnsupportedModelError:
            model_family = None
        if model_family and model_family != family:
            raise LoraDoesNotFit(f"this LoRA was trained for {family} but the MODEL is {model_family}; "
                                 "load the matching base model or another LoRA")
        trained_on, model_config = metadata.get("dojo_comfy_config"), cc.config_name(model)
        if family == Family.GENERIC.value and trained_on and trained_on != model_config:
            # Generic files name layers by the model's own paths, which other models may share in part.
            raise LoraDoesNotFit(f"this LoRA was trained in generic mode for ComfyUI's '{trained_on}' model but "
                                 f"the MODEL is '{model_config}'; load the matching base model or another LoRA")
    if model is not None:
        mismatched = cc.lora_shape_mismatches(model, lora)
        if mismatched:
            raise LoraDoesNotFit(f"{len(mismatched)} LoRA layers have shapes that do not fit this model (e.g. "
                                 f"{mismatched[0]}): it was made for another size of this model family. "
                                 "Nothing was applied.")
    if clip is None:  # a LoRA with text-encoder keys applied to the model only: those keys are not for it
        lora = {k: v for k, v in lora.items() if not k.startswith(TE_KEY_PREFIX)}
    with cc.capture_lora_warnings() as unloaded:
        new_model, new_clip = cc.apply_lora(model, clip, lora, strength_model, strength_clip)
    if unloaded:
        raise LoraDoesNotFit(f"{len(unloaded)} of the LoRA's keys match no layer of this model (e.g. "
                             f"{unloaded[0].split(': ', 1)[-1]}); it was made for another model or size. "
                             "Nothing was applied.")
    return new_model, new_clip


class DojoApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoApplyLoRA",
            display_name="Dojo Apply LoRA",
            category="Dojo/lora",
            description="Applies a LoRA (from Dojo Train LoRA or Dojo Load LoRA) to a MODEL and optionally a "
                        "CLIP, through ComfyUI's own LoRA path; chains with LoraLoader and other LoRAs.",
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the LoRA to (returned as a patched copy)."),
                io.LoraModel.Input("lora", tooltip="The LoRA tensors."),
                io.Float.Input("strength_model", default=1.0, min=-20.0, max=20.0, step=0.01,
                               tooltip="How strongly the LoRA changes the model; negative inverts it."),
                io.Clip.Input("clip", optional=True, tooltip="Optional text encoder, for LoRAs that train it."),
                io.Float.Input("strength_clip", default=1.0, min=-20.0, max=20.0, step=0.01,
                               tooltip="How strongly the LoRA changes the text encoder."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip")],
        )

    @classmethod
    def execute(cls, model, lora, strength_model, clip=None, strength_clip=1.0) -> io.NodeOutput:
        new_model, new_clip = apply_checked(model, clip, lora, strength_model, strength_clip)
        return io.NodeOutput(new_model, new_clip)


class DojoSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoSaveLoRA",
            display_name="Dojo Save LoRA",
            category="Dojo/lora",
            is_output_node=True,
            description="Saves a LoRA into models/loras as .safetensors with its training metadata; never "
                        "overwrites (a counter is added), and writes atomically.",
            inputs=[
                io.LoraModel.Input("lora", tooltip="The LoRA to save."),
                io.String.Input("filename_prefix", default="dojo/my_lora",
                                tooltip="File name inside models/loras; a subfolder is allowed; _00001 is appended."),
                io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="fp16",
                               tooltip="Precision of the saved tensors (fp16 loads everywhere and halves the size)."),
                io.String.Input("trigger_word", default="", optional=True,
                                tooltip="Recorded in the metadata (overrides the dataset's trigger word)."),
                io.String.Input("base_model_name", default="", optional=True,
                                tooltip="Recorded in the metadata, e.g. flux1-dev.safetensors."),
                io.Boolean.Input("bundle_embedding", default=False, optional=True,
                                 tooltip="Pivotal LoRAs only: also put the embedding inside the LoRA file "
                                         "(bundle_emb.* keys), which A1111 / Forge read. ComfyUI's LoraLoader "
                                         "ignores those keys with a 'lora key not loaded' warning each. The "
                                         "embedding is always saved as its own file in models/embeddings."),
            ],
            hidden=cc.GRAPH_HIDDEN_INPUTS,  # the graph is embedded in the metadata, as ComfyUI does in PNGs
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written, relative to models/loras."),
                     io.String.Output(display_name="embedding_prompt",
                                      tooltip="Pivotal LoRAs: what a prompt writes to use the embedding saved "
                                              "with it (embedding:<file name>); empty otherwise.")],
        )

    @classmethod
    def execute(cls, lora, filename_prefix, save_dtype, trigger_word="", base_model_name="",
                bundle_embedding=False) -> io.NodeOutput:
        root = Path(cc.lora_directories()[0])
        target = resolve_inside(root, filename_prefix, "filename_prefix")
        path = next_free_path(target.parent, target.name, ".safetensors")
        metadata = dict(getattr(lora, "metadata", {}))
        metadata.update({"dojo_version": __version__, "ss_training_comment": "trained with ComfyUI-Dojo"})
        if trigger_word:
            metadata["dojo_trigger_word"] = trigger_word
        if base_model_name:
            metadata["dojo_base_model"] = metadata["ss_sd_model_name"] = base_model_name
        graph = cc.hidden_graph(cls)
        metadata = sharing_metadata("lora", metadata, *graph)
        dtype = SAVE_DTYPES[save_dtype]
        tensors = {k: v.to(dtype) for k, v in lora.items()}
        relative = path.relative_to(root).as_posix()
        embedding, prompt = getattr(lora, "embedding", None), ""
        if embedding is not None:
            # Pivotal tuning: the embedding's own file (ComfyUI: Load LoRA + embedding:<file>), written first
            # so that the LoRA's metadata can name it; fp32, as the vectors were trained (a few KB).
            prompt = save_embedding(embedding, filename_prefix, "fp32", base_model_name, graph,
                                    {"dojo_lora_file": relative})
            metadata.update({"dojo_pivotal_embedding": embedding.name, "dojo_embedding_file": prompt})
            if bundle_embedding:  # A1111's bundle; ComfyUI's LoraLoader warns about every one of these keys
                tensors.update({k: v.float() for k, v in bundle_tensors(embedding.name, embedding.vectors).items()})
                metadata["dojo_bundled_embedding"] = embedding.name
        metadata = for_file(metadata, tensors, path.stem, metadata.get("dojo_trigger_word"))
        with out_of_memory_as("saving the LoRA", "save_dtype (fp16 needs half of fp32) or the rank it was trained with"):
            save_safetensors_new(path, tensors, metadata)
        log.info("Dojo: saved LoRA to %s", path)
        return io.NodeOutput(relative, prompt, ui={"text": [relative] + ([prompt] if prompt else [])})


def bundled_embedding(bundled: dict):
    """The first embedding a LoRA file bundles (pivotal tuning), as a DojoEmbedding; None if it has none."""
    if not bundled:
        return None
    from .ti_training import DojoEmbedding
    name, vectors = next(iter(bundled.items()))
    return DojoEmbedding(name, {k: v.float() for k, v in vectors.items()}, {"dojo_bundled_in_lora": "true"})


def read_lora_file(path: Path) -> DojoLoRA:
    """Safetensors only (no pickle); .pt/.ckpt only if they load with torch.load(weights_only=True)."""
    import safetensors
    import safetensors.torch
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            tensors, bundled = split_bundle(safetensors.torch.load_file(str(path)))
        except Exception as e:
            raise ValueError(f"cannot read LoRA file {path.name}: {e}. Is it a complete .safetensors file?") from e
        check_lora_tensors(tensors, f"LoRA file {path.name}")
        return DojoLoRA(tensors, metadata, bundled_embedding(bundled))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"refusing {path.name}: it is not a .safetensors file and does not load safely with "
                         f"torch.load(weights_only=True) ({type(e).__name__}). Convert it to .safetensors.") from e
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise ValueError(f"{path.name} does not hold a plain dictionary of tensors")
    check_lora_tensors(data, f"LoRA file {path.name}")
    return DojoLoRA(data, {})


class DojoLoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoLoadLoRA",
            display_name="Dojo Load LoRA",
            category="Dojo/lora",
            description="Loads a LoRA file from models/loras (safetensors) with its metadata, to apply it with "
                        "Dojo Apply LoRA.",
            inputs=[io.Combo.Input("lora_name", options=cc.lora_file_names(),
                                   tooltip="A file in models/loras.")],
            outputs=[io.LoraModel.Output(display_name="lora"),
                     io.String.Output(display_name="metadata", tooltip="The file's metadata as JSON.")],
        )

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        full = cc.lora_file_path(lora_name)
        if full is None:
            raise FileNotFoundError(f"no LoRA named '{lora_name}' in models/loras")
        lora = read_lora_file(Path(full))
        return io.NodeOutput(lora, json.dumps(lora.metadata, indent=1, sort_keys=True))
