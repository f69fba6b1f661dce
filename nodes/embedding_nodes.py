"""Textual inversion nodes: train an embedding on MODEL + CLIP, apply it to a CLIP in memory (prompts
then say `embedding:<name>`, weights as usual), save it into models/embeddings, load a file."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .. import __version__
from ..training import families
from ..training.file_metadata import embedding_file_keys
from ..training.files import next_free_path, save_safetensors_new
from ..training.loop import LRSchedule, Precision, TrainConfig
from ..training.loss_plot import render_loss_plot
from ..training.recipes import default_timestep_sampling
from ..training.sharing import sharing_metadata
from ..training.textual_inversion import CaptionMode, embedding_file_tensors, vectors_from_file
from ..training.timesteps import TimestepSampling
from . import comfy_compat as cc
from .comfy_compat import io, ui
from .comfy_model import ComfyDenoisingModel
from .dataset_nodes import ENCODE_LOWER, encode_latents, encode_once, epoch0_captions
from .memory_planning import MEMORY_PLAN_OPTIONS, MEMORY_PLAN_TOOLTIP
from .paths import resolve_inside
from .previews import PreviewRequest, preview_settings, sample_widgets, with_samples
from .ti_training import DojoEmbedding, EmbeddingJob, check_embedding_name, train_embedding
from .failures import out_of_memory_as, report_cancel
from .train_lora import AUTO, checkpoint_root, image_tensor, loss_map, run_folders
from .types import DatasetType, EmbeddingType

log = logging.getLogger("comfyui-dojo")
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# An embedding's family from its encoder keys (each spec's `text_encoders`).
FAMILY_BY_KEYS = {tuple(sorted(s.text_encoders)): s.family.value for s in families.all_specs() if s.text_encoders}


def embedding_family(embedding: DojoEmbedding) -> str:
    return FAMILY_BY_KEYS.get(tuple(sorted(embedding.vectors)), "unknown")


class DojoTrainTextualInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoTrainTextualInversion",
            display_name="Dojo Train Textual Inversion",
            category="Dojo/train",
            is_output_node=True,
            description="Trains a textual-inversion embedding (new token vectors; SD1.5: CLIP-L, SDXL: CLIP-L "
                        "and CLIP-G together) with the model's native objective. Latents are encoded once; "
                        "the text encoder runs every step with the vectors spliced into the prompt. MODEL and "
                        "CLIP are not changed. Cancel keeps a checkpoint in output/dojo_checkpoints.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 or SDXL model the embedding is for."),
                io.Clip.Input("clip", tooltip="The text encoder of the same checkpoint (its clip skip is used)."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint; images are encoded once, before "
                                            "training."),
                DatasetType.Input("dataset", tooltip="From Dojo Load Image Dataset (images and their captions)."),
                io.String.Input("embedding_name", default="my_embedding",
                                tooltip="The name prompts use: embedding:<name>. Letters, digits, _ and -."),
                io.Combo.Input("captions", options=[m.value for m in CaptionMode], default=CaptionMode.OBJECT.value,
                               tooltip="object / style: built-in templates ('a photo of a {token}', 'a painting "
                                       "in the style of {token}'...). captions: the dataset's captions, where "
                                       "{token} or the trigger word becomes the embedding (else it is put first)."),
                io.Int.Input("num_vectors", default=1, min=1, max=16,
                             tooltip="Vectors (tokens) per text encoder: more captures more, but each takes a "
                                     "place of the prompt's 75 tokens. 1-4 is usual."),
                io.String.Input("init_word", default="*",
                                tooltip="The vectors start as this word's token embeddings (repeated or cut to "
                                        "num_vectors), e.g. 'cat', 'painting'."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000,
                             tooltip="Optimizer steps; anchors use 500-3000."),
                io.Int.Input("batch_size", default=1, min=1, max=256,
                             tooltip="Images per step (a batch never mixes bucket sizes)."),
                io.Float.Input("learning_rate", default=5e-4, min=1e-7, max=10.0, step=1e-5,
                               tooltip="AdamW learning rate of the vectors (5e-4 is the usual value)."),
                io.Combo.Input("lr_schedule", options=[s.value for s in LRSchedule], default=LRSchedule.CONSTANT.value,
                               tooltip="Learning-rate schedule after warm-up."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100_000,
                             tooltip="Steps of linear learning-rate warm-up (fewer than steps)."),
                io.Combo.Input("timestep_sampling", options=[AUTO] + [t.value for t in TimestepSampling], default=AUTO,
                               tooltip="Where training samples the noise level; auto = uniform for SD models."),
                io.Combo.Input("precision", options=[p.value for p in Precision], default=Precision.BF16.value,
                               tooltip="bf16 autocast with fp32 vectors (fast), or full fp32."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=cc.SEED_CONTROL,
                             tooltip="Same inputs and seed give the same embedding, bit for bit."),
                io.Int.Input("checkpoint_every", default=0, min=0, max=1_000_000,
                             tooltip="Write a resumable checkpoint every N steps (0 = only at the end or on cancel)."),
                io.String.Input("run_name", default="dojo_embedding",
                                tooltip="Name of this run's checkpoint folder in output/dojo_checkpoints."),
                io.String.Input("resume_from", default="", optional=True,
                                tooltip="A run folder (or run/step_NNNNNN) in output/dojo_checkpoints to continue "
                                        "exactly; settings must match. Empty = start fresh."),
                io.Boolean.Input("cache_latents_to_disk", default=False, optional=True,
                                 tooltip="Keep the image latents in <output>/dojo_cache and reuse them in later runs."),
                io.Combo.Input("memory_plan", options=MEMORY_PLAN_OPTIONS, default=MEMORY_PLAN_OPTIONS[0],
                               optional=True, tooltip=MEMORY_PLAN_TOOLTIP),
                io.String.Input("preview_prompt", default="", multiline=True, optional=True,
                                tooltip="Optional: a prompt to sample previews with while training, e.g. 'a photo "
                                        "of {token} on a beach'. {token} (or embedding:<name>) is the embedding "
                                        "as it stands; a prompt without either gets it in front. Empty = no "
                                        "previews. The training CLIP encodes it at every preview."),
                io.String.Input("preview_negative", default="", multiline=True, optional=True,
                                tooltip="Negative prompt of the previews."),
                *sample_widgets(),
            ],
            outputs=[
                EmbeddingType.Output(display_name="embedding",
                                     tooltip="The trained embedding, for Dojo Apply Embedding / Save Embedding."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step."),
                io.Image.Output(display_name="loss_graph", tooltip="The loss curve."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, embedding_name, captions, num_vectors, init_word, steps,
                batch_size, learning_rate, lr_schedule, warmup_steps, timestep_sampling, precision, seed,
                checkpoint_every, run_name, resume_from="", cache_latents_to_disk=False,
                memory_plan=AUTO, preview_prompt="", preview_negative="", **sample) -> io.NodeOutput:
        name = check_embedding_name(embedding_name)
        view = ComfyDenoisingModel(model)
        sampling = default_timestep_sampling(view.schedule.prediction) if timestep_sampling == AUTO \
            else TimestepSampling(timestep_sampling)
        train_config = TrainConfig(
            steps=steps, learning_rate=learning_rate, lr_schedule=LRSchedule(lr_schedule), warmup_steps=warmup_steps,
            timestep_sampling=sampling, precision=Precision(precision), seed=seed,
            weight_decay=0.0)  # decay would pull the vectors towards zero norm, away from real token embeddings
        root = checkpoint_root()
        folders = run_folders(root, resume_from, run_name, "dojo_embedding", "Dojo Train Textual Inversion")
        per_item = epoch0_captions(dataset)
        bar = cc.progress_bar(len(dataset.items))
        with out_of_memory_as("encoding the dataset with the VAE", ENCODE_LOWER):
            item_latents, _ = encode_once(lambda cache: encode_latents(dataset, vae, cache, bar), cache_latents_to_disk)
        latents, texts = [], []
        for latent, variants in zip(item_latents, per_item):
            for caption in variants:  # repeats share one latent tensor
                latents.append(latent)
                texts.append(caption)
        trigger = dataset.config.captions.trigger
        extra = {"dojo_dataset": dataset.root.name, "dojo_num_train_images": str(len(dataset.items))}
        if trigger:
            extra["dojo_trigger_word"] = trigger
        job = EmbeddingJob(name=name, train=train_config, num_vectors=num_vectors, init_word=init_word,
                           caption_mode=CaptionMode(captions), trigger_word=trigger, batch_size=batch_size,
                           checkpoint_every=checkpoint_every, checkpoint_dir=folders.run_dir, resume_from=folders.resume,
                           extra_metadata=extra, memory_plan=memory_plan == AUTO)
        settings = preview_settings(**sample)
        if preview_prompt.strip() and settings.every > 0:
            job.previews = PreviewRequest(settings, vae, preview_prompt, preview_negative)
        result = train_embedding(model, clip, latents, texts, job)
        if result.cancelled:
            report_cancel(result.steps_done, steps, result.last_checkpoint, folders.run_dir, root)
            cc.raise_interrupt()
        image = image_tensor(with_samples(render_loss_plot(result.losses, title="Dojo embedding loss"), result.samples))
        return io.NodeOutput(result.embedding, loss_map(result.losses), image, ui=ui.PreviewImage(image, cls=cls))


class DojoApplyEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoApplyEmbedding",
            display_name="Dojo Apply Embedding",
            category="Dojo/embedding",
            description="Returns a copy of the CLIP on which prompts resolve embedding:<name> to this in-memory "
                        "embedding (no file needed), with ComfyUI's syntax and weights, e.g. "
                        "'(embedding:my_cat:1.2)'. Chain several to use several embeddings in one prompt.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder (SD1.5 or SDXL) the embedding was trained for."),
                EmbeddingType.Input("embedding", tooltip="From Dojo Train Textual Inversion or Dojo Load Embedding."),
                io.String.Input("name", default="", optional=True,
                                tooltip="The prompt name (embedding:<name>); empty = the embedding's own name."),
            ],
            outputs=[io.Clip.Output(display_name="clip", tooltip="A CLIP that knows the embedding.")],
        )

    @classmethod
    def execute(cls, clip, embedding, name="") -> io.NodeOutput:
        name = check_embedding_name(name) if name and name.strip() else embedding.name
        keys = cc.clip_encoder_keys(clip)
        if sorted(embedding.vectors) != keys:
            raise ValueError(f"this embedding has vectors for {sorted(embedding.vectors)} but the CLIP's text "
                             f"encoders are {keys}: it was trained for another model family "
                             f"({embedding_family(embedding)})")
        for key, v in embedding.vectors.items():
            width = cc.clip_token_rows(clip, key, "a").shape[-1]
            if v.shape[-1] != width:
                raise ValueError(f"this embedding's {key} vectors are {v.shape[-1]} wide but the CLIP's {key} "
                                 f"takes {width}: it was made for another model; nothing was applied")
        vectors = {k: v.detach().to("cpu", torch.float32).clone() for k, v in embedding.vectors.items()}
        return io.NodeOutput(cc.clip_with_embeddings(clip, {name: vectors}))


class DojoSaveEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoSaveEmbedding",
            display_name="Dojo Save Embedding",
            category="Dojo/embedding",
            is_output_node=True,
            description="Saves an embedding into models/embeddings as .safetensors (SD1.5: emb_params; SDXL: "
                        "clip_l + clip_g, as A1111 and ComfyUI read them) with metadata; never overwrites (a "
                        "counter is added), writes atomically. Prompts then use embedding:<file name>.",
            hidden=cc.GRAPH_HIDDEN_INPUTS,  # the graph is embedded in the metadata, as ComfyUI does in PNGs
            inputs=[
                EmbeddingType.Input("embedding", tooltip="The embedding to save."),
                io.String.Input("filename_prefix", default="my_embedding",
                                tooltip="File name inside models/embeddings (a subfolder is allowed); _00001 is "
                                        "appended. The prompt name is the file name without .safetensors."),
                io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="fp32",
                               tooltip="fp32 keeps the trained vectors exactly (a few KB); fp16 halves that."),
                io.String.Input("base_model_name", default="", optional=True,
                                tooltip="Recorded in the metadata, e.g. sd_xl_base_1.0.safetensors."),
            ],
            outputs=[io.String.Output(display_name="prompt_name",
                                      tooltip="What a prompt writes to use the file: embedding:<name>.")],
        )

    @classmethod
    def execute(cls, embedding, filename_prefix, save_dtype, base_model_name="") -> io.NodeOutput:
        root = Path(cc.embedding_directories()[0])
        target = resolve_inside(root, filename_prefix, "filename_prefix")
        if any(c.isspace() for c in target.name):
            raise ValueError(f"filename_prefix '{filename_prefix}' has spaces: a prompt could not name the file")
        path = next_free_path(target.parent, target.name, ".safetensors")
        metadata = {**embedding.metadata, "dojo_version": __version__, "dojo_family": embedding_family(embedding),
                    "dojo_num_vectors": str(embedding.num_vectors)}
        if base_model_name:
            metadata["dojo_base_model"] = base_model_name
        if metadata["dojo_family"] != "unknown":
            metadata.update(embedding_file_keys(metadata["dojo_family"], name=path.stem))
        metadata = sharing_metadata("embedding", metadata, *cc.hidden_graph(cls))
        tensors = embedding_file_tensors(embedding.vectors)
        with out_of_memory_as("saving the embedding", "num_vectors"):
            save_safetensors_new(path, {k: v.to(SAVE_DTYPES[save_dtype]) for k, v in tensors.items()}, metadata)
        prompt_name = "embedding:" + path.relative_to(root).with_suffix("").as_posix()
        log.info("Dojo: saved embedding to %s (use it as %s)", path, prompt_name)
        return io.NodeOutput(prompt_name, ui={"text": [prompt_name]})


def read_embedding_file(path: Path, name: str) -> DojoEmbedding:
    import safetensors
    import safetensors.torch
    if path.suffix != ".safetensors":
        raise ValueError(f"refusing {path.name}: Dojo Load Embedding reads .safetensors only (no pickle)")
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = safetensors.torch.load_file(str(path))
    except Exception as e:
        raise ValueError(f"cannot read embedding file {path.name}: {e}") from e
    return DojoEmbedding(name, vectors_from_file(tensors), metadata)


class DojoLoadEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoLoadEmbedding",
            display_name="Dojo Load Embedding",
            category="Dojo/embedding",
            description="Loads a textual-inversion embedding (.safetensors) from models/embeddings, e.g. to "
                        "apply it under another name with Dojo Apply Embedding.",
            inputs=[io.Combo.Input("embedding_name", options=cc.embedding_safetensors_names(),
                                   tooltip="A .safetensors file in models/embeddings.")],
            outputs=[EmbeddingType.Output(display_name="embedding"),
                     io.String.Output(display_name="metadata", tooltip="The file's metadata as JSON.")],
        )

    @classmethod
    def execute(cls, embedding_name) -> io.NodeOutput:
        full = cc.embedding_file_path(embedding_name)
        if full is None:
            raise FileNotFoundError(f"no embedding named '{embedding_name}' in models/embeddings")
        name = Path(embedding_name).with_suffix("").as_posix()
        embedding = read_embedding_file(Path(full), name)
        return io.NodeOutput(embedding, json.dumps(embedding.metadata, indent=1, sort_keys=True))
