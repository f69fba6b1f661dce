"""Peak memory and speed of HunyuanVideo LoRA training against clip length, with and without gradient
checkpointing (CPU, this machine).

Each (frames, checkpointing) pair runs in a fresh subprocess (ru_maxrss is per process): ComfyUI's own
HunyuanVideo network in the loader-detectable tiny configuration (hidden 256, 2 heads, 2 double + 2
single blocks, context 768: tests/integration/tiny_comfy_models.HUNYUAN_VIDEO_TINY, ~10 M parameters;
--hidden builds a wider one) wrapped in a ModelPatcher as ComfyUI's loaders do, one sample of latent
[16, T, side, side] with T = 1 + (frames - 1) / 4 (the 4x temporal VAE), 32 text tokens, trained with
`nodes.lora_training.train_lora` exactly as the Train LoRA node does (rank 32, all block linears, bf16
autocast, batch 1). The default side 24 is 192x192 pixels: at 33 frames that is 9 x 12 x 12 = 1296 video
tokens, where activations, not weights, dominate.

Columns: median s/step over the timed steps (the first step is warm-up); peak RSS of the process;
"training MB" = peak RSS minus RSS just before training (activations, saved tensors, LoRA + optimizer,
the trainer's one-off copy of the loader's inference-mode weights).

Usage: COMFYUI_PATH=/root/ComfyUI python bench/bench_hunyuan_video_memory.py [--side 24] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRAMES = (1, 9, 17, 33)


def run_one(frames: int, checkpointing: bool, side: int, steps: int, hidden: int, blocks_to_swap: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_grad_protection import boot
    boot(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI")))
    import importlib
    import statistics
    import torch
    torch.set_num_threads(1)
    import inprocess_models
    import tiny_comfy_models as tiny
    lt = importlib.import_module("comfyui_dojo.nodes.lora_training")
    adapters = importlib.import_module("comfyui_dojo.training.adapters")
    batches = importlib.import_module("comfyui_dojo.training.batches")
    encoded = importlib.import_module("comfyui_dojo.training.encoded")
    loop = importlib.import_module("comfyui_dojo.training.loop")
    protocol = importlib.import_module("comfyui_dojo.training.protocol")

    config = dict(tiny.HUNYUAN_VIDEO_TINY, hidden_size=hidden, num_heads=max(2, hidden // 128))
    patcher = inprocess_models._patcher("HunyuanVideo", config, seed=0)
    params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    g = torch.Generator().manual_seed(0)
    t_latent = 1 + (frames - 1) // 4
    cond = protocol.Conditioning(torch.randn(1, 32, 768, generator=g), torch.randn(1, 768, generator=g),
                                 {"guidance": 1.0})
    data = encoded.EncodedDataset([batches.Sample(torch.randn(16, t_latent, side, side, generator=g), cond)],
                                  ["a clip"])
    stamps = []

    class TimedProgress(lt.TrainingProgress):
        def step(self, *args, **kwargs):
            stamps.append(time.perf_counter())
            return super().step(*args, **kwargs)

    lt.TrainingProgress = TimedProgress
    job = lt.LoraJob(adapter=adapters.AdapterConfig(rank=32, alpha=32), targets=protocol.TargetPreset.ALL_LINEAR,
                     train=loop.TrainConfig(steps=steps + 1, learning_rate=2e-4, seed=0),
                     batch_size=1, gradient_checkpointing=checkpointing, blocks_to_swap=blocks_to_swap)
    import peft  # noqa: F401  (imported by the trainer; loaded here so it is not counted as training memory)
    import peft.tuners.lora  # noqa: F401
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lt.train_lora(patcher, data, job)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"s_per_step": statistics.median(b - a for a, b in zip(stamps, stamps[1:])),
            "peak_rss_mb": rss_peak / 1024, "train_rss_mb": (rss_peak - rss_before) / 1024,
            "params_m": params / 1e6, "tokens": t_latent * (side // 2) ** 2}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", type=int, default=24, help="latent side (pixels / 8)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--frames", type=int, nargs="*", default=list(FRAMES))
    parser.add_argument("--blocks-to-swap", type=int, default=0)
    parser.add_argument("--one", nargs=2, metavar=("FRAMES", "CKPT"))
    opts = parser.parse_args()
    if opts.one:
        print(json.dumps(run_one(int(opts.one[0]), opts.one[1] == "on", opts.side, opts.steps, opts.hidden,
                                 opts.blocks_to_swap)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"ComfyUI {os.environ.get('COMFYUI_PATH', '~/ComfyUI')}; HunyuanVideo hidden {opts.hidden}, 2+2 blocks; "
          f"latent {opts.side}x{opts.side} ({opts.side * 8}x{opts.side * 8} px); rank 32 all block linears; bf16 "
          f"autocast; batch 1; median of {opts.steps} steps after 1 warm-up; 1 thread; blocks_to_swap "
          f"{opts.blocks_to_swap}")
    print(f"{'frames':>6}{'latent T':>9}{'tokens':>8}{'checkpointing':>15}{'s/step':>9}{'peak RSS MB':>13}"
          f"{'training MB':>13}")
    for frames in opts.frames:
        for ckpt in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--one", str(frames), ckpt, "--side", str(opts.side),
                                  "--steps", str(opts.steps), "--hidden", str(opts.hidden),
                                  "--blocks-to-swap", str(opts.blocks_to_swap)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"{frames:>6} {ckpt}: failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{frames:>6}{1 + (frames - 1) // 4:>9}{r['tokens']:>8}{ckpt:>15}{r['s_per_step']:>9.3f}"
                  f"{r['peak_rss_mb']:>13.0f}{r['train_rss_mb']:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
