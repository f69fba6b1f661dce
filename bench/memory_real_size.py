"""The memory planner at real model sizes: Flux.1 [dev], HunyuanVideo, SDXL and SD1.5 built with ComfyUI's
own classes and configs on fake tensors (no weights, no memory), planned for the seed jobs on 12, 16 and
24 GB cards, next to what the anchor trainers publish.

Each model is built on the meta device at full width and depth, with bf16 or fp8 (e4m3fn,
computed in bf16 as ComfyUI's manual-cast ops do) weights; the planner then measures one training step
(forward + backward through ComfyUI's model, Dojo's LoRA and its checkpointing / gradient protection) at
the job's token count, as the Train LoRA node does before step 1. ComfyUI is booted with PyTorch
attention (what it uses on NVIDIA cards), so attention memory is that of SDPA's fused kernels.
"free" = the card's memory minus 0.6 GiB for the CUDA context and the desktop. Activations do not depend
on the optimizer; the table shows the planner's choice per card for AdamW and 8-bit AdamW.

Usage: COMFYUI_PATH=~/ComfyUI python bench/memory_real_size.py [--only flux hunyuan_video sdxl sd15]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 2 ** 30
CARDS = (12, 16, 24)
CONTEXT = int(0.6 * GiB)

FLUX_DEV = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=768,
                context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                axes_dim=[16, 56, 56], theta=10_000, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
HUNYUAN_VIDEO = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2],
                     vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=20,
                     depth_single_blocks=40, axes_dim=[16, 56, 56], theta=256, qkv_bias=True, guidance_embed=True,
                     meanflow=False, byt5=False, use_cond_type_embedding=False, vision_in_dim=None,
                     meanflow_sum=False)
SDXL = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
            channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_spatial_transformer=True, legacy=False,
            context_dim=2048, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True,
            adm_in_channels=2816, num_classes="sequential", use_temporal_attention=False,
            use_temporal_resblock=False)
SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
            channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
            transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], use_spatial_transformer=True,
            legacy=False, context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
            adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False)

# family: (config class, unet config, latent [C, (T,) H, W], text tokens, text width, pooled width, rank,
#          targets, label)
JOBS = {
    "flux": ("Flux", FLUX_DEV, (16, 128, 128), 512, 4096, 768, 16, "attention_mlp", "Flux.1 dev 1024 px, rank 16"),
    "hunyuan_video": ("HunyuanVideo", HUNYUAN_VIDEO, (16, 9, 64, 64), 256, 4096, 768, 32, "all_linear",
                      "HunyuanVideo 512x512x33, rank 32"),
    "sdxl": ("SDXL", SDXL, (4, 128, 128), 77, 2048, 1280, 16, "attention_mlp", "SDXL 1024 px, rank 16"),
    "sd15": ("SD15", SD15, (4, 64, 64), 77, 768, None, 16, "attention_mlp", "SD1.5 512 px, rank 16"),
}
ANCHORS = {
    "flux": "kohya sd-scripts: Flux LoRA in 12 GB with fp8 base, block swap and 8-bit AdamW (+ checkpointing)",
    "hunyuan_video": "diffusion-pipe: rank 32 at 512x512x33 in under 23 GB; musubi-tuner: block swap on 12 GB",
    "sdxl": "kohya / OneTrainer: SDXL LoRA at 1024 px on 12 GB with checkpointing (bf16 base)",
    "sd15": "SD1.5 LoRA at 512 px trains on 6-8 GB cards",
}


def boot():
    comfy_root = os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))
    sys.path.insert(0, comfy_root)
    from comfy.cli_args import args
    args.use_pytorch_cross_attention = True  # what ComfyUI runs on NVIDIA: SDPA's fused kernels
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_grad_protection import boot as boot_comfy
    boot_comfy(comfy_root)


def plan_family(family: str, weight_dtype: str):
    import torch
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    mp = importlib.import_module("comfyui_dojo.training.memory_plan")
    planning = importlib.import_module("comfyui_dojo.nodes.memory_planning")
    comfy_model = importlib.import_module("comfyui_dojo.nodes.comfy_model")
    adapters = importlib.import_module("comfyui_dojo.training.adapters")
    batches = importlib.import_module("comfyui_dojo.training.batches")
    loop = importlib.import_module("comfyui_dojo.training.loop")
    protocol = importlib.import_module("comfyui_dojo.training.protocol")
    config_name, unet, latent, tokens, width, pooled, rank, targets, _ = JOBS[family]
    config = getattr(comfy.supported_models, config_name)(dict(unet))
    if weight_dtype == "fp8":
        config.set_inference_dtype(torch.float8_e4m3fn, torch.bfloat16)
    else:
        config.set_inference_dtype(torch.bfloat16, None)
    g = torch.Generator().manual_seed(0)
    extra = {"guidance": 1.0} if family in ("flux", "hunyuan_video") else {}
    cond = protocol.Conditioning(torch.randn(1, tokens, width, generator=g),
                                 None if pooled is None else torch.randn(1, pooled, generator=g), extra)
    samples = [batches.Sample(torch.randn(*latent, generator=g), cond)]
    optimizers = importlib.import_module("comfyui_dojo.training.optimizers")
    # The network on the meta device (shapes and dtypes, no storage); the schedule stays real, as numbers.
    model = config.get_model({}, device=torch.device("meta"))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("meta"),
                                               offload_device=torch.device("cpu"))
    view = comfy_model.ComfyDenoisingModel(patcher)
    model.model_sampling.to("meta")  # the forward's sigma lookups then stay on the meta device
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    attached = adapters.attach_adapter(view.diffusion_model, view.adaptable_modules(protocol.TargetPreset(targets)),
                                       adapters.AdapterConfig(rank=rank, alpha=rank))
    job = planning.step_job(view, patcher, samples, 1, loop.TrainConfig(steps=1), attached.parameters(), "meta")
    # Planned for a CUDA card: parked blocks leave the device, CUDA's runtime allowance.
    job = dataclasses.replace(job, model=dataclasses.replace(job.model, swap_saves_memory=True), device_type="cuda")
    t0 = time.perf_counter()
    estimates = {gc: mp.estimate(job, gc, 0) for gc in (False, True)}
    seconds = time.perf_counter() - t0
    rows = []
    for optimizer in ("adamw", "adamw8bit"):
        j = dataclasses.replace(job, optimizer=optimizers.OptimizerKind(optimizer))
        for card in CARDS:
            rows.append((optimizer, card, mp.plan(j, card * GiB - CONTEXT, "cuda", checkpointing=None,
                                                  blocks_to_swap=None)))
    return params, job, estimates, rows, seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=list(JOBS))
    parser.add_argument("--dtypes", nargs="*", default=["bf16", "fp8"])
    opts = parser.parse_args()
    boot()
    import torch
    torch.set_num_threads(1)
    mp = importlib.import_module("comfyui_dojo.training.memory_plan")
    print(f"free = card - {CONTEXT / GiB:.1f} GiB; margin = 8% + 0.5 GiB; GB = 1e9 bytes; batch 1; bf16 autocast")
    for family in opts.only:
        for dtype in opts.dtypes:
            if family in ("sd15", "sdxl") and dtype == "fp8":
                continue
            params, job, est, rows, seconds = plan_family(family, dtype)
            print(f"\n{JOBS[family][-1]}, {dtype} weights ({params / 1e9:.2f} B params, {len(job.model.block_bytes)} "
                  f"swappable blocks; measured in {seconds:.0f} s)")
            for gc, e in est.items():
                print(f"  checkpointing {'on ' if gc else 'off'}: {mp.gb(e.total):>8}  ({e.parts()}, AdamW)")
            for optimizer, card, p in rows:
                verdict = p.summary() if p.fits else f"does not fit (best {mp.gb(p.estimate.total)}: " \
                    f"checkpointing on, {p.blocks_to_swap} blocks swapped)"
                print(f"  {card:>2} GB card, {optimizer:<9}: {verdict}")
            print(f"  anchor: {ANCHORS[family]}")


if __name__ == "__main__":
    main()
