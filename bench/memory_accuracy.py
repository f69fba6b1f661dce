"""How close the memory planner's estimate is to what a training step really uses (CPU, this machine).

Each configuration runs in a fresh subprocess: ComfyUI's own model class (SD1.5, SDXL, Flux,
HunyuanVideo stand-ins, widths chosen so activations, not the runtime, dominate) wrapped in a
ModelPatcher as ComfyUI's loaders do, trained with `nodes.lora_training.train_lora` exactly as the Train
LoRA node does, for 2 steps, with `memory_plan` asked to keep the given settings (it only estimates).

"measured" = the process's peak RSS during train_lora (VmHWM, reset just before it through
/proc/self/clear_refs) minus its RSS just before: activations, gradients, adapter + optimizer state, the
trainer's copies. "estimate" = the planner's total minus the weights (on the CPU they are already
resident before training). A warm-up run at 1/16 of the tokens, with one more text token, first loads
the runtime's one-off libraries and buffers ("first-run MB") without running any matmul of the measured
step at its shape, so the measured run is a first run at a new shape, as the planner assumes: its
workspace term is oneDNN's kernels kept per new bf16 op shape (KERNEL_CACHE_BYTES) plus what malloc's
heap adds beyond the live bytes, found by replaying the step's allocations through glibc's malloc.

`--malloc fixed` runs the configurations with glibc's mmap threshold fixed at 128 KiB
(MALLOC_MMAP_THRESHOLD_=131072): freed tensors above it go back to the system at once, so RSS follows
the live bytes instead of the heap's high-water mark (the planner's replay sees the same setting). The
default is glibc's own dynamic threshold. `--kernels` measures the per-shape kernel cost on this CPU.

Usage: COMFYUI_PATH=~/ComfyUI python bench/memory_accuracy.py [--only NAME ...] [--malloc default|fixed] [--kernels]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name: (family, width, latent shape (C, [T,] H, W), batch, checkpointing, blocks_to_swap)
CONFIGS = {
    "sd15 512 gc-off": ("sd15", 64, (4, 64, 64), 1, False, 0),
    "sd15 512 gc-on": ("sd15", 64, (4, 64, 64), 1, True, 0),
    "sd15 768 b2 gc-off": ("sd15", 64, (4, 96, 96), 2, False, 0),
    "sdxl 1024 gc-off": ("sdxl", 64, (4, 128, 128), 1, False, 0),
    "sdxl 1024 gc-on": ("sdxl", 64, (4, 128, 128), 1, True, 0),
    "sdxl 1024 b2 gc-on": ("sdxl", 64, (4, 128, 128), 2, True, 0),
    "flux 512 gc-off": ("flux", 256, (16, 64, 64), 1, False, 0),
    "flux 512 gc-on": ("flux", 256, (16, 64, 64), 1, True, 0),
    "flux 1024 gc-on": ("flux", 256, (16, 128, 128), 1, True, 0),
    "flux 512 b2 gc-off": ("flux", 256, (16, 64, 64), 2, False, 0),
    "flux 512 gc-on swap2": ("flux", 256, (16, 64, 64), 1, True, 2),
    "hv 192x33 gc-off": ("hunyuan_video", 256, (16, 9, 24, 24), 1, False, 0),
    "hv 192x33 gc-on": ("hunyuan_video", 256, (16, 9, 24, 24), 1, True, 0),
    "hv 256x17 gc-off": ("hunyuan_video", 256, (16, 5, 32, 32), 1, False, 0),
    "hv 192x33 gc-on swap2": ("hunyuan_video", 256, (16, 9, 24, 24), 1, True, 2),
    "hv 256x17 b2 gc-on swap2": ("hunyuan_video", 256, (16, 5, 32, 32), 2, True, 2),
}


def boot():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_grad_protection import boot as boot_comfy
    boot_comfy(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI")))


def build_patcher(family: str, width: int):
    """A stand-in of the family: ComfyUI's own classes and configs, random weights, fp32."""
    import inprocess_models
    import tiny_comfy_models as tiny
    if family == "sd15":
        return inprocess_models.tiny_sd15_patcher(model_channels=width)
    if family == "sdxl":
        unet = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": width,
                "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 2],
                "transformer_depth_output": [0, 0, 2, 2], "transformer_depth_middle": 2,
                "use_spatial_transformer": True, "legacy": False, "context_dim": 2048, "num_heads": -1,
                "num_head_channels": 32, "use_linear_in_transformer": True, "adm_in_channels": 2816,
                "num_classes": "sequential", "use_temporal_attention": False, "use_temporal_resblock": False}
        return inprocess_models._patcher("SDXL", unet, seed=0)
    if family == "flux":
        net = dict(tiny.FLUX_TINY_NET, hidden_size=width, num_heads=width // 64, axes_dim=[16, 24, 24],
                   context_in_dim=256, vec_in_dim=256)
        return inprocess_models._patcher("Flux", dict(net, image_model="flux"), seed=0)
    net = dict(tiny.HUNYUAN_VIDEO_TINY, hidden_size=width, num_heads=max(2, width // 128))
    return inprocess_models._patcher("HunyuanVideo", net, seed=0)


def dataset(family: str, shape, batch: int, text_tokens: int = 0):
    """`batch` samples of latent `shape` with the family's text conditioning (`text_tokens` more tokens)."""
    import importlib
    import torch
    batches = importlib.import_module("comfyui_dojo.training.batches")
    encoded = importlib.import_module("comfyui_dojo.training.encoded")
    protocol = importlib.import_module("comfyui_dojo.training.protocol")
    g = torch.Generator().manual_seed(0)
    if family == "sd15":
        cond = protocol.Conditioning(torch.randn(1, 77 + text_tokens, 768, generator=g), None, {})
    elif family == "sdxl":
        cond = protocol.Conditioning(torch.randn(1, 77 + text_tokens, 2048, generator=g), torch.randn(1, 1280, generator=g), {})
    elif family == "flux":
        cond = protocol.Conditioning(torch.randn(1, 64 + text_tokens, 256, generator=g), torch.randn(1, 256, generator=g), {})
    else:
        cond = protocol.Conditioning(torch.randn(1, 32 + text_tokens, 768, generator=g), torch.randn(1, 768, generator=g), {})
    samples = [batches.Sample(torch.randn(*shape, generator=g), cond) for _ in range(batch)]
    return encoded.EncodedDataset(samples, ["a photo"] * batch)


def status_kb(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


def run_one(name: str) -> dict:
    family, width, shape, batch, checkpointing, swap = CONFIGS[name]
    boot()
    import importlib
    import torch
    torch.set_num_threads(1)
    lt = importlib.import_module("comfyui_dojo.nodes.lora_training")
    mp = importlib.import_module("comfyui_dojo.nodes.memory_planning")
    adapters = importlib.import_module("comfyui_dojo.training.adapters")
    loop = importlib.import_module("comfyui_dojo.training.loop")
    families = importlib.import_module("comfyui_dojo.training.families")
    import peft.tuners.lora  # noqa: F401  (loaded before measuring)
    patcher = build_patcher(family, width)
    recipe = families.spec(family).recipe   # the family's default rank and targets
    targets, rank = recipe.targets, recipe.rank

    def job(steps, plan):
        return lt.LoraJob(adapter=adapters.AdapterConfig(rank=rank, alpha=rank), targets=targets,
                          train=loop.TrainConfig(steps=steps, learning_rate=1e-4, seed=0), batch_size=batch,
                          gradient_checkpointing=checkpointing, blocks_to_swap=swap,
                          memory_plan=mp.PlanRequest(False, False) if plan else None)

    small = tuple(shape[:-2]) + (max(8, shape[-2] // 4), max(8, shape[-1] // 4))
    before_warmup = status_kb("VmRSS")
    # The warm-up has its own text length too, so no matmul of the measured step has run at its shape
    # before: the measured run compiles its oneDNN kernels as a first run at a new shape does.
    lt.train_lora(patcher, dataset(family, small, batch, text_tokens=1), job(1, False))
    first_run = status_kb("VmHWM") - before_warmup
    data = dataset(family, shape, batch)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    rss_before = status_kb("VmRSS")
    result = lt.train_lora(patcher, data, job(2, True))
    measured = (status_kb("VmHWM") - rss_before) * 1024
    e = result.memory_plan.estimate
    return {"measured": measured, "estimate": e.total - e.weights, "activations": e.activations,
            "adapter": e.adapter, "workspace": e.workspace, "weights": e.weights, "first_run": first_run * 1024,
            "params_m": sum(p.numel() for p in patcher.model.diffusion_model.parameters()) / 1e6}


def kernel_costs(n: int = 40) -> None:
    """What oneDNN keeps per new shape of a bf16 op on this CPU (the planner's KERNEL_CACHE_BYTES): RSS
    growth over n calls, each at a shape not seen before, with glibc's threshold fixed so freed tensors do
    not stay in the heap."""
    import torch
    torch.set_num_threads(1)
    x_conv = torch.randn(64, 64, 3, 3)
    w = torch.randn(512, 256)
    ops = {"linear (mm)": lambda i: torch.nn.functional.linear(torch.randn(100 + 8 * i, 256), w),
           "bmm": lambda i: torch.bmm(torch.randn(4, 100 + 8 * i, 64), torch.randn(4, 64, 100 + 8 * i)),
           "conv2d (convolution)": lambda i: torch.nn.functional.conv2d(torch.randn(1, 64, 16 + i, 16 + i), x_conv,
                                                                        padding=1)}
    print(f"oneDNN primitive kept per new bf16 shape ({n} new shapes each, torch {torch.__version__}):")
    for label, op in ops.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            op(0)
            before = status_kb("VmRSS")
            for i in range(1, n + 1):
                op(i)
        print(f"  {label:<22}{(status_kb('VmRSS') - before) / n:>8.0f} KB")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--one")
    parser.add_argument("--kernels", action="store_true", help="measure the per-shape kernel cache cost and exit")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--malloc", choices=["default", "fixed"], default="default")
    opts = parser.parse_args()
    if opts.one:
        print(json.dumps(run_one(opts.one)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if opts.malloc == "fixed" or opts.kernels:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    if opts.kernels:
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        "import memory_accuracy; memory_accuracy.kernel_costs()"], env=env, check=True)
        return
    print("CPU, 1 thread, bf16 autocast, fp32 weights, LoRA rank 16 (HunyuanVideo 32), 2 steps; MB = 2^20 bytes; "
          + ("glibc mmap threshold fixed at 128 KiB" if opts.malloc == "fixed" else "glibc's dynamic mmap threshold"))
    print(f"{'configuration':<26}{'params M':>9}{'measured MB':>12}{'estimate MB':>12}{'error':>8}"
          f"{'activ. MB':>10}{'adapter MB':>11}{'workspace MB':>13}{'first-run MB':>13}")
    errors = []
    for name in opts.only or CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"{name:<26} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        err = r["estimate"] / r["measured"] - 1
        errors.append((abs(err), name))
        mb = 2 ** 20
        print(f"{name:<26}{r['params_m']:>9.1f}{r['measured'] / mb:>12.0f}{r['estimate'] / mb:>12.0f}{err:>+8.1%}"
              f"{r['activations'] / mb:>10.0f}{r['adapter'] / mb:>11.1f}{r['workspace'] / mb:>13.0f}{r['first_run'] / mb:>13.0f}",
              flush=True)
    if errors:
        within = sum(e <= 0.15 for e, _ in errors)
        print(f"within 15%: {within} of {len(errors)}; furthest off: "
              + ", ".join(f"{n} ({e:.0%})" for e, n in sorted(errors, reverse=True)[:3]))


if __name__ == "__main__":
    main()
