"""Dojo LoRA Grid: which checkpoint, at which strength? One labelled grid of samples, rows = LoRAs (or the
checkpoints of a training run), columns = strength x seed, every cell sampled with ComfyUI's own sampler
on the MODEL with the LoRA applied through ComfyUI's own LoRA path (as LoraLoader -> KSampler would).
Strength 0 is the base model itself. Every LoRA is checked against the MODEL before anything is sampled."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..training import families
from ..training.adapters import ADAPTER_NAME
from ..training.checkpoints import CheckpointError, load_checkpoint
from ..training.families import FamilySpec
from ..training.image_grid import labelled_grid, to_array, to_pil
from ..training.lora_formats import lora_state_dict
from . import comfy_compat as cc
from .comfy_compat import io, ui
from .lora_nodes import LoraDoesNotFit, apply_checked
from .lora_training import DojoLoRA
from .paths import resolve_inside
from .train_lora import checkpoint_root

log = logging.getLogger("comfyui-dojo")
MAX_LORA_INPUTS = 4
ROWS_LORAS, ROWS_RUN = "loras", "run checkpoints"


@dataclass
class GridRow:
    label: str
    lora: dict


def parse_numbers(text: str, kind, name: str) -> list:
    """'0, 0.6, 1.0' -> [0.0, 0.6, 1.0]; a clear error naming the input otherwise."""
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    try:
        values = [kind(p.strip()) for p in parts]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of {'integers' if kind is int else 'numbers'}, "
                         f"e.g. {'1, 2' if kind is int else '0, 0.6, 1.0, 1.4'}; got '{text}'") from None
    if not values:
        raise ValueError(f"{name} is empty: give at least one value")
    return values


def run_spec(model, family: str) -> FamilySpec:
    """The spec a checkpoint's run trained with: the MODEL's own when it is that family (so a spec built at
    run time serves), else the registered one (the layout then tells the mismatch in words)."""
    try:
        own = cc.model_spec(model)
    except cc.UnsupportedModelError:
        own = None
    return own if own is not None and own.family.value == family else families.spec(family)


def checkpoint_lora(folder: Path, model) -> DojoLoRA:
    """A training checkpoint (adapter weights as the run held them) as a LoRA in the family's file layout,
    with the scale alpha/rank baked into up, as Train LoRA exports it."""
    try:
        checkpoint = load_checkpoint(folder)
    except CheckpointError as e:
        raise LoraDoesNotFit(f"checkpoint {folder.name}: {e}") from e
    run = checkpoint.run
    if run.get("adapter") != "lora":
        kind = "a textual-inversion run" if run.get("adapter") == "textual_inversion" else f"a {run.get('adapter')} run"
        raise LoraDoesNotFit(f"checkpoint {folder.parent.name}/{folder.name} is {kind}: the grid shows plain LoRA "
                             "checkpoints (give the trained LoRA itself as lora_1 instead)")
    spec = run_spec(model, run["family"])
    scale = float(run["alpha"]) / float(run["rank"])
    suffix_a, suffix_b = f".lora_A.{ADAPTER_NAME}.weight", f".lora_B.{ADAPTER_NAME}.weight"
    factors = {}
    for key, down in checkpoint.adapter.items():
        if key.endswith(suffix_a):
            name = key[: -len(suffix_a)]
            factors[name] = (down.float(), checkpoint.adapter[name + suffix_b].float() * scale)
    names = cc.sd_unet_diffusers_names(model) if spec.lora_layout.needs_diffusers_names else None
    try:
        tensors = lora_state_dict(spec, factors, names)
    except ValueError as e:
        raise LoraDoesNotFit(f"checkpoint {folder.parent.name}/{folder.name} does not fit this MODEL: {e}") from e
    return DojoLoRA(tensors, {"dojo_family": spec.family.value, "dojo_steps": str(checkpoint.step),
                              "dojo_training": json.dumps(run, sort_keys=True)})


def run_rows(run_folder: str | Path, model) -> list[GridRow]:
    root = checkpoint_root()
    folder = resolve_inside(root, str(run_folder).strip(), "run_folder")
    if not folder.is_dir():
        raise FileNotFoundError(f"run_folder '{run_folder}' does not exist in {root}: name a run folder that "
                                "Dojo Train LoRA wrote (its run_name)")
    steps = sorted(p for p in folder.glob("step_*") if (p / "state.json").is_file())
    if not steps:
        raise FileNotFoundError(f"run_folder '{run_folder}' holds no complete checkpoint (step_NNNNNN/state.json); "
                                "set checkpoint_every on Dojo Train LoRA to keep checkpoints")
    return [GridRow(f"step {int(p.name.split('_')[1])}", checkpoint_lora(p, model)) for p in steps]


def lora_label(name: str, lora) -> str:
    meta = getattr(lora, "metadata", {}) or {}
    return f"{name} ({meta['dojo_steps']} steps)" if meta.get("dojo_steps") else name


def check_rows(model, clip, rows: list[GridRow]) -> None:
    """Every LoRA must fit the MODEL (family, layer names, shapes) before any cell is sampled; the error
    names the LoRA. Applying here makes clones only: the MODEL is never changed."""
    for row in rows:
        try:
            apply_checked(model, clip, row.lora, 1.0, 1.0)
        except LoraDoesNotFit as e:
            raise LoraDoesNotFit(f"LoRA '{row.label}' does not fit this MODEL: {e}") from None


def middle_frame(frames: torch.Tensor) -> torch.Tensor:
    return frames[frames.shape[0] // 2]


class DojoLoRAGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoLoRAGrid",
            display_name="Dojo LoRA Grid",
            category="Dojo/lora",
            is_output_node=True,
            description="Samples every LoRA (or every checkpoint of a training run) at several strengths and "
                        "seeds with ComfyUI's own sampler, and draws one labelled grid: rows = LoRA or step, "
                        "columns = strength x seed. Strength 0 is the base model. Video models: the middle "
                        "frame of each cell.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRAs were trained on."),
                io.Vae.Input("vae", tooltip="Decodes the samples."),
                io.Conditioning.Input("positive", tooltip="The prompt, e.g. with the trigger word."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (unused at cfg 1)."),
                io.Latent.Input("latent", tooltip="An empty latent of the size to sample (image or video)."),
                io.String.Input("strengths", default="0, 0.6, 1.0, 1.4",
                                tooltip="LoRA strengths, comma-separated; 0 = the base model."),
                io.String.Input("seeds", default="1, 2", tooltip="Noise seeds, comma-separated."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampler steps per cell."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1,
                               tooltip="CFG scale (7 for SD1.5 / SDXL; 1 for Flux and HunyuanVideo)."),
                io.Combo.Input("sampler_name", options=cc.SAMPLER_NAMES, default="euler",
                               tooltip="The sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=cc.SCHEDULER_NAMES, default="simple",
                               tooltip="The noise schedule, as in KSampler."),
                io.Combo.Input("rows", options=[ROWS_LORAS, ROWS_RUN], default=ROWS_LORAS,
                               tooltip="loras: each connected LoRA is a row. run checkpoints: each checkpoint of "
                                       "the training run that made the connected LoRA (Train LoRA's output) is a "
                                       "row, in step order: which checkpoint is best?"),
                io.String.Input("run_folder", default="", optional=True,
                                tooltip="A run folder in output/dojo_checkpoints (Train LoRA's run_name): each "
                                        "checkpoint step becomes a row, in step order."),
                *[io.LoraModel.Input(f"lora_{i}", optional=True,
                                     tooltip="A LoRA (Dojo Train / Load LoRA) to show as a row.")
                  for i in range(1, MAX_LORA_INPUTS + 1)],
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: LoRAs with text-encoder layers change this CLIP too (at the cell's "
                                      "strength); the prompts are then encoded per cell from the texts below."),
                io.String.Input("positive_text", default="", multiline=True, optional=True,
                                tooltip="With a CLIP: the prompt encoded per cell (overrides positive)."),
                io.String.Input("negative_text", default="", multiline=True, optional=True,
                                tooltip="With a CLIP: the negative prompt encoded per cell (overrides negative)."),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="The labelled grid."),
                io.Image.Output(display_name="images", tooltip="Every cell, row by row, as one batch."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, positive, negative, latent, strengths, seeds, steps, cfg, sampler_name, scheduler,
                rows=ROWS_LORAS, run_folder="", clip=None, positive_text="", negative_text="",
                **loras) -> io.NodeOutput:
        strength_values = parse_numbers(strengths, float, "strengths")
        seed_values = parse_numbers(seeds, int, "seeds")
        connected = [(name, lora) for name, lora in sorted(loras.items()) if lora is not None]
        if rows == ROWS_RUN:
            runs = [getattr(lora, "run_folder", None) for _, lora in connected]
            if not connected or None in runs:
                missing = [name for (name, _), run in zip(connected, runs) if run is None] or ["lora_1"]
                raise ValueError(f"rows = run checkpoints needs LoRAs straight from Dojo Train LoRA; {missing[0]} "
                                 "comes from elsewhere (set rows to loras, or give run_folder)")
            grid_rows = [row for run in dict.fromkeys(runs) for row in run_rows(run, model)]
        else:
            grid_rows = [GridRow(lora_label(name, lora), lora) for name, lora in connected]
        if run_folder and run_folder.strip():
            grid_rows += run_rows(run_folder, model)
        if not grid_rows:
            raise ValueError("Dojo LoRA Grid has no LoRA to show: connect lora_1 or set run_folder")
        text_clip = clip if clip is not None and positive_text.strip() else None
        check_rows(model, text_clip, grid_rows)

        samples = latent["samples"]
        lora_strengths = [s for s in strength_values if s != 0.0]
        bar = cc.progress_bar((len(grid_rows) * len(lora_strengths) + (0.0 in strength_values)) * len(seed_values))

        def sample(m, c, seed):
            pos, neg = positive, negative
            if c is not None:
                pos, neg = cc.encode_prompt(c, positive_text), cc.encode_prompt(c, negative_text)
            frames = cc.vae_decode(vae, cc.ksample(m, pos, neg, samples, seed, steps, cfg, sampler_name, scheduler))
            bar.update(1)
            return middle_frame(frames).float().cpu()

        base = {seed: sample(model, text_clip, seed) for seed in seed_values} if 0.0 in strength_values else {}
        cells = []
        for row in grid_rows:
            line = []
            for strength in strength_values:
                if strength == 0.0:
                    line += [base[seed] for seed in seed_values]
                    continue
                applied, applied_clip = apply_checked(model, text_clip, row.lora, strength, strength)
                line += [sample(applied, applied_clip, seed) for seed in seed_values]
            cells.append(line)
        columns = [[f"strength {s:g}", f"seed {seed}"] for s in strength_values for seed in seed_values]
        grid = labelled_grid([[to_pil(c.numpy()) for c in line] for line in cells], [r.label for r in grid_rows],
                             columns)
        grid_tensor = torch.from_numpy(to_array(grid))[None]
        batch = torch.stack([c for line in cells for c in line])
        return io.NodeOutput(grid_tensor, batch, ui=ui.PreviewImage(grid_tensor, cls=cls))
