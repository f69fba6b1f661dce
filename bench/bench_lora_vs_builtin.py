"""Dojo's Train LoRA against ComfyUI's built-in TrainLoraNode, and against the frozen floor.

Same model (the tiny SD1.5 checkpoint of the integration tests, loaded by CheckpointLoaderSimple),
same latents and conditioning, rank, steps, batch and precision. Each variant runs in a fresh
subprocess so that its peak RSS is its own. Per-step time comes from a global optimizer-step hook
(both trainers call optimizer.step once per step); the floor is a frozen forward + backward (gradient
with respect to the input latents, no trainable weights) through the same ComfyUI model.

    python bench/bench_lora_vs_builtin.py [--steps 12] [--batch 2] [--latent 32] [--rank 16]
Needs a ComfyUI tree at $COMFYUI_PATH (default ~/ComfyUI). Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "integration"), str(REPO / "tests")]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    import torch
    import pack_import  # noqa: F401  (makes comfyui_dojo importable from this checkout)
    from comfy_harness import ComfyUI, comfyui_path, make_base_directory
    torch.set_num_threads(args.threads)
    comfy = ComfyUI(comfyui_path(), make_base_directory(Path(tempfile.mkdtemp())))
    import tiny_files
    ckpt = tiny_files.provide_sd15_checkpoint(comfy.base)
    with torch.inference_mode():
        model = comfy.nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(ckpt)[0]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch * 2, 4, args.latent, args.latent, generator=g)
    context = torch.randn(1, 77, 768, generator=g)
    pack = sys.modules[comfy.pack_module_name()].__name__
    import importlib
    times: list[float] = []
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(lambda *a, **k: times.append(time.perf_counter()))
    base_rss = rss_mb()
    start = time.perf_counter()
    if args.variant == "dojo":
        mods = {n: importlib.import_module(f"{pack}.{n}") for n in (
            "nodes.train_lora", "training.batches", "training.encoded", "training.protocol")}
        samples = [mods["training.batches"].Sample(l, mods["training.protocol"].Conditioning(context.clone()))
                   for l in latents]
        data = mods["training.encoded"].EncodedDataset(samples, ["x"] * len(samples))
        mods["nodes.train_lora"].DojoTrainLoRA.execute(
            model, data, steps=args.steps, batch_size=args.batch, grad_accumulation=1, learning_rate=5e-4,
            rank=args.rank, alpha=float(args.rank), adapter="lora", targets=args.targets, optimizer="adamw",
            lr_schedule="constant", warmup_steps=0, timestep_sampling="uniform", shift=0.0, min_snr_gamma=0.0,
            noise_offset=0.0, gradient_checkpointing="on" if args.checkpointing else "off",
            precision=args.precision, seed=0, checkpoint_every=0, run_name="bench")
    elif args.variant == "builtin":
        node = comfy.nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"]
        schema = {i.id: i for i in node.GET_SCHEMA().inputs}
        schema_inputs = set(schema)
        kwargs = dict(model=[model], latents=[{"samples": latents}], positive=[[[context.clone(), {}]]],
                      batch_size=[args.batch], steps=[args.steps], grad_accumulation_steps=[1],
                      learning_rate=[5e-4], rank=[args.rank], optimizer=["AdamW"], loss_function=["MSE"],
                      seed=[0], training_dtype=[args.precision], lora_dtype=[args.precision],
                      quantized_backward=[False], algorithm=[schema["algorithm"].default], gradient_checkpointing=[args.checkpointing],
                      checkpoint_depth=[1], offloading=[False], existing_lora=["[None]"], bucket_mode=[False],
                      bypass_mode=[False])
        node.execute(**{k: v for k, v in kwargs.items() if k in schema_inputs})
    else:  # floor: frozen forward + backward through the same ComfyUI model
        cm = importlib.import_module(f"{pack}.nodes.comfy_model")
        cc = importlib.import_module(f"{pack}.nodes.comfy_compat")
        proto = importlib.import_module(f"{pack}.training.protocol")
        with torch.inference_mode(False), torch.enable_grad():
            patcher = cc.training_clone(model)
            cc.load_for_compute(patcher)
            cc.materialize_inference_tensors(patcher.model)
            view = cm.ComfyDenoisingModel(patcher)
            cond = proto.Conditioning(context.expand(args.batch, -1, -1).clone())
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
            for step in range(args.steps):
                x = latents[: args.batch].clone().requires_grad_(True)
                with autocast:
                    out = view.predict(x, torch.rand(args.batch), cond)
                out.float().pow(2).mean().backward()
                times.append(time.perf_counter())
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(times, times[1:])][1:]  # drop the first (warm-up) interval
    return {"variant": args.variant, "s_per_step": statistics.median(steps), "steps_timed": len(steps),
            "total_s": total, "peak_rss_mb": rss_mb(), "rss_before_training_mb": base_rss}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--targets", default="auto", help="Dojo's target preset (the built-in adapts every layer)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both trainers")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(child(args)))
        return
    rows = []
    for variant in ("floor", "dojo", "builtin"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={v}" for k, v in (("steps", args.steps), ("batch", args.batch), ("latent", args.latent),
                                       ("rank", args.rank), ("precision", args.precision), ("threads", args.threads),
                                       ("targets", args.targets))]
        if args.checkpointing:
            cmd.append("--checkpointing")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            print(f"{variant} failed:\n{proc.stderr[-3000:]}")
            continue
        rows.append(json.loads(line[-1][7:]))
    by = {r["variant"]: r for r in rows}
    print(f"\nSD1.5 tiny checkpoint (44 M UNet), latent {args.latent}x{args.latent}, batch {args.batch}, rank "
          f"{args.rank}, Dojo targets {args.targets}, {args.precision}, checkpointing {'on' if args.checkpointing else 'off'}, {args.steps} steps, "
          f"{args.threads} thread(s)")
    print(f"{'variant':10s} {'s/step':>8s} {'peak RSS MB':>12s} {'training MB':>12s}")
    for r in rows:
        print(f"{r['variant']:10s} {r['s_per_step']:8.3f} {r['peak_rss_mb']:12.0f} "
              f"{r['peak_rss_mb'] - r['rss_before_training_mb']:12.0f}")
    if "dojo" in by and "floor" in by:
        print(f"dojo / floor time:   {by['dojo']['s_per_step'] / by['floor']['s_per_step']:.2f}x (target <= 1.10x)")
    if "dojo" in by and "builtin" in by:
        print(f"dojo / built-in time: {by['dojo']['s_per_step'] / by['builtin']['s_per_step']:.2f}x (target <= 0.8x)")
        print(f"dojo / built-in peak RSS: {by['dojo']['peak_rss_mb'] / by['builtin']['peak_rss_mb']:.2f}x (target <= 0.9x)")


if __name__ == "__main__":
    main()
