"""What sample previews cost: seconds of preview per 1000 training steps, and the share of training time,
at Train LoRA's preview defaults (sample_every 250, 20 steps, cfg auto, 512 x 512, 17 frames) and the
bundled workflows' training settings.

Measured: tiny stand-ins of the real architectures (ComfyUI's own classes, random weights; the VAEs of
the integration tests) trained at each workflow's real latent size on this CPU, once without previews and
once with a preview every 2 steps; the difference per preview is its cost. Tiny networks make the
forward cheap next to ComfyUI's per-step overhead, so the measured share is not the real-size one; the
table therefore also gives the real-size estimate from counting forward passes, which is what decides at
full size (forward FLOPs scale with tokens; see the notes printed below the table).

    python bench/bench_preview_cost.py [--steps 4] [--only flux,hv_clips]
Needs a ComfyUI tree at $COMFYUI_PATH (default ~/ComfyUI). Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "integration"), str(REPO / "tests")]

# workflow -> (family, latent shape trained on (C, [T,] H/8, W/8), gradient checkpointing (auto), preview frames,
#              run length in steps, preview cfg passes)
WORKFLOWS = {
    "flux": ("flux", (16, 64, 64), True, 1, 1000, 1),              # dojo_flux_lora_trigger_word: 512 px
    "hv_images": ("hunyuan_video", (16, 1, 64, 64), True, 5, 1000, 1),   # 512 px stills, 5-frame previews
    "hv_clips": ("hunyuan_video", (16, 9, 48, 48), True, 17, 1500, 1),   # 33 frames at 384 px
    "sd15": ("sd15", (4, 64, 64), False, 1, 1000, 2),              # 512 px, cfg 7: positive + negative
}
SAMPLE_EVERY, SAMPLE_STEPS, SAMPLE_SIDE = 250, 20, 512
# Real-size cost of one training step in forward-pass equivalents: forward + backward (~2 forwards) = 3;
# gradient checkpointing recomputes the forward (DESIGN.md section 8: 1.4-1.7x per step) -> ~4.5.
STEP_FORWARDS = {False: 3.0, True: 4.5}


def tokens(shape, family) -> int:
    """Image tokens of a latent (patch 2 x 2 for the transformers, one per latent pixel group for SD)."""
    if family == "sd15":
        return shape[-1] * shape[-2]
    frames = shape[1] if len(shape) == 4 else 1
    return frames * (shape[-1] // 2) * (shape[-2] // 2)


def preview_tokens(family, frames) -> int:
    side = SAMPLE_SIDE // 8
    if family == "sd15":
        return side * side
    return ((frames - 1) // 4 + 1) * (side // 2) ** 2 if family == "hunyuan_video" else (side // 2) ** 2


def previews_per_1000(run_steps: int) -> float:
    return (run_steps // SAMPLE_EVERY + 1) * 1000 / run_steps  # every 250 steps, and at step 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", default=",".join(WORKFLOWS))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    import pack_import  # noqa: F401
    from comfy_harness import ComfyUI, comfyui_path, make_base_directory
    comfy = ComfyUI(comfyui_path(), make_base_directory(Path(tempfile.mkdtemp())))
    import tiny_files
    from inprocess_models import tiny_flux_patcher, tiny_hunyuan_video_patcher, tiny_sd15_patcher
    pack = sys.modules[comfy.pack_module_name()].__name__
    mod = {n: importlib.import_module(f"{pack}.{n}") for n in (
        "nodes.lora_training", "nodes.previews", "training.batches", "training.encoded", "training.protocol",
        "training.adapters", "training.loop")}
    builders = {"flux": tiny_flux_patcher, "hunyuan_video": tiny_hunyuan_video_patcher, "sd15": tiny_sd15_patcher}
    vae_files = {"flux": tiny_files.provide_flux_taesd, "hunyuan_video": tiny_files.provide_taehv,
                 "sd15": tiny_files.provide_sd_taesd}
    widths = {"flux": (48, 32), "hunyuan_video": (48, 32), "sd15": (768, None)}

    def cond(family, g):
        width, pooled = widths[family]
        extra = {"guidance": 1.0} if family != "sd15" else {}
        return mod["training.protocol"].Conditioning(torch.randn(1, 7, width, generator=g),
                                                     None if pooled is None else torch.randn(1, pooled, generator=g),
                                                     extra)

    def prompt(family, g):
        width, pooled = widths[family]
        extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=g)}
        if family != "sd15":
            extra["guidance"] = 3.5
        return [[torch.randn(1, 7, width, generator=g), extra]]

    rows = []
    for name in args.only.split(","):
        family, shape, checkpointing, frames, run_steps, passes = WORKFLOWS[name]
        g = torch.Generator().manual_seed(0)
        data = mod["training.encoded"].EncodedDataset(
            [mod["training.batches"].Sample(torch.randn(*shape, generator=g) * 0.5, cond(family, g)) for _ in range(2)],
            ["a", "b"])
        with torch.inference_mode():
            vae = comfy.nodes.NODE_CLASS_MAPPINGS["VAELoader"]().load_vae(vae_files[family](comfy.base))[0]
        settings = mod["nodes.previews"].PreviewSettings(every=args.steps, frames=frames)  # at step 0 and the end

        def run(previews, steps=args.steps):
            job = mod["nodes.lora_training"].LoraJob(
                adapter=mod["training.adapters"].AdapterConfig(rank=16, alpha=16),
                targets=mod["training.protocol"].TargetPreset.ATTENTION_MLP,
                train=mod["training.loop"].TrainConfig(steps=steps, learning_rate=1e-4, seed=1),
                gradient_checkpointing=checkpointing,
                previews=None if not previews else mod["nodes.previews"].PreviewRequest(
                    settings, vae, prompt(family, g), prompt(family, g)))
            start = time.perf_counter()
            result = mod["nodes.lora_training"].train_lora(builders[family](), data, job)
            return time.perf_counter() - start, len(result.samples)

        run(False, steps=1)  # warm-up (first-call costs of ComfyUI and torch)
        plain, _ = run(False)
        with_previews, n = run(True)
        step_s = plain / args.steps
        preview_s = (with_previews - plain) / n
        per_1000 = previews_per_1000(run_steps)
        measured = per_1000 * preview_s / (1000 * step_s)
        real = per_1000 * SAMPLE_STEPS * passes * preview_tokens(family, frames) / tokens(shape, family) \
            / (1000 * STEP_FORWARDS[checkpointing])
        if not rows:
            print(f"\nPreviews at the defaults: every {SAMPLE_EVERY} steps and at step 0, {SAMPLE_STEPS} sampler "
                  f"steps, {SAMPLE_SIDE} x {SAMPLE_SIDE}, bf16 training, 1 CPU thread")
            print(f"{'workflow':<11} {'train s/step':>12} {'s/preview':>10} {'preview s/1000 steps':>21} "
                  f"{'share (tiny, here)':>19} {'share (real size, est.)':>24}")
        rows.append(name)
        print(f"{name:<11} {step_s:>12.3f} {preview_s:>10.2f} {per_1000 * preview_s:>21.1f} {measured:>18.1%} "
              f"{real:>23.1%}", flush=True)
    print("\nReal-size estimate: previews per 1000 steps x sampler steps x cfg passes x (preview tokens / training "
          "tokens) / (1000 x forward-equivalents per training step: 3, or 4.5 with gradient checkpointing). "
          "Attention's quadratic term is small at these sequence lengths for 3072-wide models (< 20% of a "
          "forward) and the VAE decode is not counted; the tiny models' share is dominated by fixed "
          "per-call overhead of ComfyUI's sampler and by their cheap training step, so it overstates the cost.")


if __name__ == "__main__":
    main()
