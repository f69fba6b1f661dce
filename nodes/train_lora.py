"""Dojo Train LoRA: train a LoRA (or DoRA / LoHa / LoKr) on the graph's MODEL from an encoded dataset."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..training.adapters import AdapterConfig, AdapterType
from ..training.checkpoints import RunFolders, plan_run_folders
from ..training.loop import LRSchedule, Precision, TrainConfig
from ..training.loss_plot import render_loss_plot
from ..training.optimizers import OptimizerKind
from ..training.protocol import TargetPreset
from ..training.recipes import CHECKPOINTING_PARAMETER_THRESHOLD, default_timestep_sampling
from ..training.timesteps import TimestepSampling
from . import comfy_compat as cc
from .comfy_compat import io, ui
from .comfy_model import ComfyDenoisingModel
from .failures import report_cancel
from .lora_training import LoraJob, train_lora
from .memory_planning import MEMORY_PLAN_OPTIONS, MEMORY_PLAN_TOOLTIP, PlanRequest
from .paths import resolve_inside
from .te_lora import TeTargets, pivotal_for, text_encoder_job
from .previews import lora_preview_request, sample_widgets, with_samples
from .types import EncodedDatasetType, PivotalType

log = logging.getLogger("comfyui-dojo")
AUTO = "auto"
CHECKPOINT_FOLDER = "dojo_checkpoints"


def image_tensor(pil_image) -> torch.Tensor:
    """PIL -> ComfyUI IMAGE [1, H, W, 3] in [0, 1]."""
    return torch.from_numpy(np.asarray(pil_image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def loss_map(losses: list[float]) -> dict:
    """ComfyUI's LOSS_MAP (what its own Loss Graph node reads)."""
    return {"loss": [torch.tensor(v) for v in losses]}


def dataset_metadata(dataset) -> dict[str, str]:
    """What the encoded dataset tells a LoRA file about its training data (names only, no paths)."""
    info = dataset.info
    meta = {"ss_num_train_images": str(info.get("items", len(dataset)))}
    if info.get("trigger_word"):
        meta["dojo_trigger_word"] = str(info["trigger_word"])
    if info.get("source"):
        meta["dojo_dataset"] = str(info["source"])
    return meta


def checkpoint_root() -> Path:
    return Path(cc.output_directory()) / CHECKPOINT_FOLDER


def run_folders(root: Path, resume_from: str, run_name: str, default_name: str, trainer: str) -> RunFolders:
    """The checkpoint to resume (from the untrusted resume_from) and the folder this run writes into;
    resuming an earlier step of a run with later checkpoints branches into a new folder (never overwriting)."""
    if resume_from and resume_from.strip():
        resume = resolve_inside(root, resume_from.strip(), "resume_from", allow_root=False)
        if not resume.is_dir():
            raise FileNotFoundError(f"resume_from '{resume_from}' does not exist in {root}; "
                                    f"pick a run folder written by an earlier {trainer}")
        folders = plan_run_folders(root, resume, "")
        if folders.branched:
            log.warning("Dojo: resuming %s, but its run has later checkpoints; this run writes into the new "
                        "folder %s so that none of them is overwritten", folders.resume.relative_to(root),
                        folders.run_dir)
        return folders
    return plan_run_folders(root, None, resolve_inside(root, run_name or default_name, "run_name").name)


@dataclass(frozen=True)
class AutoSettings:
    """The Train LoRA settings after 'auto' / 0 widgets are resolved for the model's family."""
    rank: int
    learning_rate: float
    targets: TargetPreset
    timestep_sampling: TimestepSampling
    shift: float                 # the shift training samples with (the model's own unless set)
    gradient_checkpointing: bool


def resolve_auto_settings(view: ComfyDenoisingModel, *, rank: int = 0, learning_rate: float = 0.0,
                          targets: str = AUTO, timestep_sampling: str = AUTO, shift: float = 0.0,
                          gradient_checkpointing: str = AUTO) -> AutoSettings:
    """A set value always wins; 'auto' and 0 take the family recipe (its spec's, training/families) and
    the model's own sampling shift."""
    recipe = view.spec.recipe
    if gradient_checkpointing == AUTO:
        size = sum(p.numel() for p in view.diffusion_model.parameters())
        checkpointing = recipe.gradient_checkpointing or size > CHECKPOINTING_PARAMETER_THRESHOLD
    else:
        checkpointing = gradient_checkpointing == "on"
    sampling = default_timestep_sampling(view.schedule.prediction) if timestep_sampling == AUTO \
        else TimestepSampling(timestep_sampling)
    return AutoSettings(rank=rank or recipe.rank, learning_rate=learning_rate or recipe.learning_rate,
                        targets=recipe.targets if targets == AUTO else TargetPreset(targets),
                        timestep_sampling=sampling, shift=shift or view.schedule.shift,
                        gradient_checkpointing=checkpointing)


class DojoTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoTrainLoRA",
            display_name="Dojo Train LoRA",
            category="Dojo/train",
            is_output_node=True,
            description="Trains a LoRA on the MODEL from an encoded dataset with the model's native objective "
                        "(eps, v or flow), without changing the MODEL. Shows the live loss; cancel keeps what "
                        "was trained as a checkpoint in output/dojo_checkpoints, which 'resume_from' continues.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to adapt (SD1.5, SDXL, Flux.1 or HunyuanVideo)."),
                EncodedDatasetType.Input("dataset", tooltip="From Dojo Encode Dataset: cached latents and captions."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000,
                             tooltip="Optimizer steps. Anchors: Flux 1000-2000, SDXL 1000-3000, HunyuanVideo 1000-2000."),
                io.Int.Input("batch_size", default=1, min=1, max=256,
                             tooltip="Samples per step; a batch never mixes bucket sizes."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024,
                             tooltip="Batches whose gradients are summed before each optimizer step."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=10.0, step=1e-5,
                               tooltip="0 = the family default (1e-4; HunyuanVideo 2e-4). Prodigy wants 1.0."),
                io.Int.Input("rank", default=0, min=0, max=1024,
                             tooltip="LoRA rank. 0 = the family default (16; HunyuanVideo 32)."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=2048.0, step=0.5,
                               tooltip="LoRA alpha (scale = alpha / rank). 0 = equal to rank."),
                io.Combo.Input("adapter", options=[a.value for a in AdapterType], default=AdapterType.LORA.value,
                               tooltip="lora (loads everywhere), dora, loha or lokr (peft implementations)."),
                io.Combo.Input("targets", options=[AUTO] + [t.value for t in TargetPreset], default=AUTO,
                               tooltip="Layers to adapt. auto = attention + MLP (HunyuanVideo: all block linears)."),
                io.Combo.Input("optimizer", options=[o.value for o in OptimizerKind], default=OptimizerKind.ADAMW.value,
                               tooltip="adamw; adamw8bit needs bitsandbytes, prodigy needs prodigyopt."),
                io.Combo.Input("lr_schedule", options=[s.value for s in LRSchedule], default=LRSchedule.CONSTANT.value,
                               tooltip="Learning-rate schedule after warm-up."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100_000,
                             tooltip="Steps of linear learning-rate warm-up (must be fewer than steps)."),
                io.Combo.Input("timestep_sampling", options=[AUTO] + [t.value for t in TimestepSampling], default=AUTO,
                               tooltip="Where training samples the noise level. auto = shift for flow models "
                                       "(Flux, HunyuanVideo), uniform for SD."),
                io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Shift for 'shift' sampling. 0 = the model's own (Flux ~3.16, HunyuanVideo 7)."),
                io.Float.Input("min_snr_gamma", default=0.0, min=0.0, max=100.0, step=0.5,
                               tooltip="Min-SNR loss weighting for SD (eps / v) models; 5 is typical; 0 = off."),
                io.Float.Input("noise_offset", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise offset for SD (eps / v) models, e.g. 0.05; 0 = off."),
                io.Combo.Input("gradient_checkpointing", options=[AUTO, "on", "off"], default=AUTO,
                               tooltip="Recompute block activations in backward: less memory, ~1.5x slower. "
                                       "auto = on for SDXL, Flux, HunyuanVideo and any model over 1B parameters."),
                io.Combo.Input("precision", options=[p.value for p in Precision], default=Precision.BF16.value,
                               tooltip="bf16 autocast with fp32 LoRA weights (fast), or full fp32."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=cc.SEED_CONTROL,
                             tooltip="Same inputs and seed give the same LoRA, bit for bit."),
                io.Int.Input("checkpoint_every", default=0, min=0, max=1_000_000,
                             tooltip="Write a resumable checkpoint every N steps (0 = only at the end or on cancel)."),
                io.String.Input("run_name", default="dojo_lora",
                                tooltip="Name of this run's checkpoint folder in output/dojo_checkpoints."),
                io.String.Input("resume_from", default="", optional=True,
                                tooltip="A run folder (or run/step_NNNNNN) in output/dojo_checkpoints to continue "
                                        "exactly; settings must match the run. Empty = start fresh."),
                io.Int.Input("blocks_to_swap", default=-1, min=-1, max=1000, optional=True,
                             tooltip="Block swap, for models too large for the GPU: keep all but this many "
                                     "transformer blocks on the GPU and stream the last N from CPU memory for "
                                     "each forward and backward. Slower (weights cross the bus every step); "
                                     "the result is identical. Use with gradient checkpointing. 0 = off; "
                                     "-1 = auto: as few as the memory plan needs (none when memory_plan is off)."),
                io.LoraModel.Input("continue_from", optional=True,
                                   tooltip="Optional: a LoRA (e.g. from Dojo Load LoRA) to start from instead of "
                                           "a fresh one; it must be a plain LoRA of the same family, targets and rank."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: the CLIP of the same checkpoint, to also train a LoRA on its text "
                                      "encoder(s) (SD1.5 CLIP-L, SDXL CLIP-L + CLIP-G, Flux CLIP-L); needs "
                                      "text_encoder_lr > 0. The CLIP itself is not changed."),
                io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=10.0, step=1e-6, optional=True,
                               tooltip="Learning rate of the text-encoder LoRA (e.g. 5e-5); 0 = the text encoder "
                                       "is not trained. While it trains, captions are encoded every step."),
                io.Combo.Input("te_targets", options=[t.value for t in TeTargets], default=TeTargets.ATTENTION_MLP.value,
                               optional=True, tooltip="Text-encoder layers to adapt: attention, or attention + MLP."),
                PivotalType.Input("pivotal", optional=True,
                                  tooltip="Optional, from Dojo Pivotal Embedding (needs clip): also train the trigger "
                                          "word's new embedding with the LoRA (pivotal tuning, SD1.5 / SDXL). Dojo "
                                          "LoRA Embedding takes it out; Save LoRA bundles it in the file."),
                io.Combo.Input("memory_plan", options=MEMORY_PLAN_OPTIONS, default=MEMORY_PLAN_OPTIONS[0],
                               optional=True, tooltip=MEMORY_PLAN_TOOLTIP),
                io.Conditioning.Input("preview_positive", optional=True,
                                      tooltip="Optional: a prompt (any text encode node) to sample previews of the "
                                              "LoRA as it trains, e.g. with the trigger word. Needs preview_vae."),
                io.Conditioning.Input("preview_negative", optional=True,
                                      tooltip="Optional negative prompt of the previews (default: the positive "
                                              "zeroed out). Unused at cfg 1."),
                io.Vae.Input("preview_vae", optional=True, tooltip="The VAE that decodes the previews."),
                *sample_widgets(),
            ],
            outputs=[
                io.LoraModel.Output(display_name="lora", tooltip="The trained LoRA, for Dojo Apply/Save LoRA."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step."),
                io.Image.Output(display_name="loss_graph", tooltip="The loss curve."),
            ],
        )

    @classmethod
    def execute(cls, model, dataset, steps, batch_size, grad_accumulation, learning_rate, rank, alpha, adapter,
                targets, optimizer, lr_schedule, warmup_steps, timestep_sampling, shift, min_snr_gamma,
                noise_offset, gradient_checkpointing, precision, seed, checkpoint_every, run_name,
                resume_from="", blocks_to_swap=-1, continue_from=None, clip=None, text_encoder_lr=0.0,
                te_targets=TeTargets.ATTENTION_MLP.value, pivotal=None, memory_plan=AUTO, preview_positive=None,
                preview_negative=None, preview_vae=None, **sample) -> io.NodeOutput:
        view = ComfyDenoisingModel(model)
        auto = resolve_auto_settings(view, rank=rank, learning_rate=learning_rate, targets=targets,
                                     timestep_sampling=timestep_sampling, shift=shift,
                                     gradient_checkpointing=gradient_checkpointing)
        rank = auto.rank
        checkpointing = auto.gradient_checkpointing
        train_config = TrainConfig(
            steps=steps, learning_rate=auto.learning_rate, optimizer=OptimizerKind(optimizer),
            grad_accumulation=grad_accumulation, lr_schedule=LRSchedule(lr_schedule), warmup_steps=warmup_steps,
            timestep_sampling=auto.timestep_sampling, shift=shift or None, min_snr_gamma=min_snr_gamma,
            noise_offset=noise_offset, precision=Precision(precision), seed=seed)
        root = checkpoint_root()
        folders = run_folders(root, resume_from, run_name, "dojo_lora", "Dojo Train LoRA")
        job = LoraJob(
            adapter=AdapterConfig(AdapterType(adapter), rank=rank, alpha=alpha or float(rank)),
            targets=auto.targets,
            train=train_config, batch_size=batch_size, gradient_checkpointing=checkpointing,
            blocks_to_swap=max(0, blocks_to_swap),
            memory_plan=PlanRequest(gradient_checkpointing == AUTO, blocks_to_swap < 0) if memory_plan == AUTO else None,
            checkpoint_every=checkpoint_every, checkpoint_dir=folders.run_dir, resume_from=folders.resume,
            init_lora=continue_from,
            text_encoder=text_encoder_job(clip, text_encoder_lr, te_targets, pivotal_for(pivotal, dataset)),
            extra_metadata=dataset_metadata(dataset),
            previews=lora_preview_request(preview_positive, preview_negative, preview_vae, **sample))
        result = train_lora(model, dataset, job)
        result.lora.run_folder = folders.run_dir.relative_to(root)  # not saved: for Dojo LoRA Grid's run checkpoints
        if result.cancelled:
            report_cancel(result.steps_done, steps, result.last_checkpoint, folders.run_dir, root)
            cc.raise_interrupt()
        graph = with_samples(render_loss_plot(result.losses, title="Dojo LoRA loss"), result.samples)
        image = image_tensor(graph)
        return io.NodeOutput(result.lora, loss_map(result.losses), image, ui=ui.PreviewImage(image, cls=cls))
