"""Headless data-parallel training speed: s/step of the bundled HunyuanVideo LoRA workflow's training run by
`python -m comfyui_dojo.headless` with 1 and with 2 processes (gloo, CPU) at the same global batch.

The workflow (workflows/dojo_hunyuan_video_lora_images.json) runs with the tests' stand-in files under its
real file names (tests/integration/test_workflows.py: a ~10 M-parameter HunyuanVideo, CLIP-L in place of the
text encoders, the TAEHV video VAE), a folder of `--batch` generated images of `--side` pixels, and
--set overrides for steps and batch size. Each rank loads the models through ComfyUI; the first timed step
is skipped (warm-up). s/step is what the runner prints at the end ("steps 2-N took ... s/step").

On this machine (2 cores shared with other jobs) two ranks can at best halve a step when each rank gets a
core: OMP_NUM_THREADS=1 per rank, so compare against one process with 1 thread (same total threads per
rank) and with 2 threads (the same cores for both).

Usage: COMFYUI_PATH=~/ComfyUI python bench/bench_headless_ddp.py [--batch 4] [--steps 12] [--side 128]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "integration")]
import pack_import  # noqa: E402,F401  (comfyui_dojo = this checkout)


def prepare(base: Path, batch: int, side: int, steps: int, precision: str) -> Path:
    """Boot ComfyUI in this process (for node schemas and the stand-in files), write the dataset and the
    API prompt; returns the prompt file."""
    from comfy_harness import ComfyUI, comfyui_path, make_base_directory
    import tiny_files
    from test_dataset_nodes import image
    from test_workflows import load, to_test_prompt
    comfy = ComfyUI(comfyui_path(), make_base_directory(base))
    for folder, real, provide in [
        ("diffusion_models", "hunyuan_video_t2v_720p_bf16.safetensors", tiny_files.provide_hunyuan_video),
        ("text_encoders", "clip_l.safetensors", tiny_files.provide_clip_l),
        ("text_encoders", "llava_llama3_fp8_scaled.safetensors", tiny_files.provide_clip_l),
        ("vae", "hunyuan_video_vae_bf16.safetensors", tiny_files.provide_taehv),
    ]:
        name = provide(base)
        source = next(p for p in (base / "models").rglob(name) if p.is_file())
        tiny_files.link_into(base, folder, real, source.resolve())
    folder = base / "input" / "hunyuan_images"
    for i in range(batch):
        image(folder / f"img{i}.png", (side, side), (40 * i % 255, 90, 160), f"a square number {i}")
    prompt = to_test_prompt(comfy, load("dojo_hunyuan_video_lora_images"))
    for node in prompt.values():
        if node["class_type"] == "DojoLoadImageDataset":
            node["inputs"].update(resolution=side, min_side=side, max_side=side, bucket_step=64)
        if node["class_type"] == "DojoTrainLoRA":
            node["inputs"].update(steps=steps, batch_size=batch, checkpoint_every=0, precision=precision)
    path = base / "bench_prompt.json"
    path.write_text(json.dumps(prompt))
    return path


def run(base: Path, prompt: Path, nproc: int, threads: int) -> tuple[float, float]:
    """(s/step after the first step, wall seconds of the whole run including ComfyUI's boot)."""
    cmd = [sys.executable, str(REPO / "headless" / "__main__.py"), str(prompt), "--comfyui",
           os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI")), "--base-directory", str(base), "--cpu",
           "--nproc", str(nproc)]
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    wall = time.time() - start
    if out.returncode != 0:
        raise SystemExit(f"headless run with --nproc {nproc} failed:\n{out.stderr[-3000:]}")
    found = re.search(r"took [\d.]+ s \(([\d.]+) s/step\)", out.stdout)
    if found is None:
        raise SystemExit(f"no timing in the output:\n{out.stdout[-2000:]}")
    return float(found.group(1)), wall


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="global batch (= images in the dataset)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--side", type=int, default=128, help="image side in pixels (latent side / 8)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dojo_bench_ddp_") as tmp:
        base = Path(tmp) / "base"
        prompt = prepare(base, args.batch, args.side, args.steps, args.precision)
        rows = [(1, 1), (1, 2), (2, 1)]
        results = {(n, t): run(base, prompt, n, t) for n, t in rows}
    print(f"\nHunyuanVideo LoRA (tiny stand-in, rank 32, all block linears), global batch {args.batch}, "
          f"{args.side}x{args.side} images, {args.precision}, {args.steps} steps, CPU gloo")
    print(f"{'processes':>9} {'threads/rank':>12} {'batch/rank':>10} {'s/step':>8} {'samples/s':>9} "
          f"{'vs 1x1':>7} {'run s':>6}")
    base_step = results[(1, 1)][0]
    for (n, t), (step, wall) in results.items():
        print(f"{n:>9} {t:>12} {args.batch / n:>10g} {step:>8.3f} {args.batch / step:>9.2f} "
              f"{base_step / step:>6.2f}x {wall:>6.0f}")


if __name__ == "__main__":
    main()
