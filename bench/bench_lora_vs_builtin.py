"""Dojo's Train LoRA against ComfyUI's built-in TrainLoraNode and against the frozen floor, per family.

Families (tiny stand-ins built with ComfyUI's own classes, bench_common.FAMILIES): SD1.5, SDXL, Flux,
HunyuanVideo on images and on a 5-latent-frame clip. For each family and checkpointing setting the
variants are

  floor           frozen forward + backward of the same ComfyUI model, no adapters (gradient w.r.t. the
                  input latents); with checkpointing, torch's checkpoint around the same blocks
                  (like with like: Dojo's checkpointing row is compared with the floor's own)
  dojo            Dojo Train LoRA with its family defaults (targets auto)
  dojo_all        Dojo Train LoRA with targets all_linear (closer to the built-in, which adapts every layer)
  builtin_bypass  TrainLoraNode, bypass mode on
  builtin         TrainLoraNode, bypass mode off (0.8 has no bypass mode: only this one)

Same latents, conditioning, rank, batch, steps and precision (bf16) for all. Each variant runs in a
fresh subprocess (its peak RSS is its own); the variants of one configuration run back to back in a
rotated order, and the whole set is repeated for --rounds interleaved rounds. s/step is the median of
the step intervals after warm-up (from a global optimizer-step hook: both trainers step once per
step). Time is the process's CPU time per step (`time.process_time`, one thread): on a shared, loaded
machine wall time mostly measures the other processes, CPU time what this one did; the wall-clock
median is printed beside it. Ratios are medians over rounds of per-round (paired) ratios. The load
average is printed per round and configuration.

    OMP_NUM_THREADS=1 python bench/bench_lora_vs_builtin.py [--families sd15,flux] [--checkpointing off,on]
        [--variants floor,dojo,...] [--rounds 3] [--steps 8] [--batch 1] [--rank 16]
Needs a ComfyUI tree at $COMFYUI_PATH (default ~/ComfyUI). Prints tables; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import bench_common as bc

VARIANTS = ("floor", "dojo", "dojo_all", "builtin_bypass", "builtin")


def child(args) -> dict:
    import torch
    version, pack = bc.boot()
    torch.set_num_threads(args.threads)
    family, checkpointing = args.family, args.checkpointing == "on"
    n = max(4, args.batch)
    latents, context, pooled = bc.inputs(family, n)
    patcher = bc.build_patcher(family)
    times: list[float] = []
    cpu_times: list[float] = []
    sys_times: list[float] = []
    trainable = {}

    def on_step(optimizer=None, *_a, **_k):
        times.append(time.perf_counter())
        cpu_times.append(time.process_time())
        sys_times.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime)
        if optimizer is not None and not trainable:
            trainable["n"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])

    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(on_step)
    rss_before = bc.rss_mb()
    if args.variant.startswith("dojo"):
        batches, encoded, train_lora = pack("training.batches"), pack("training.encoded"), pack("nodes.train_lora")
        samples = [batches.Sample(latents[i], bc.conditioning(pack, family, context[i:i + 1].clone(),
                                                               None if pooled is None else pooled[i:i + 1].clone()))
                   for i in range(n)]
        data = encoded.EncodedDataset(samples, ["x"] * n)
        train_lora.DojoTrainLoRA.execute(
            patcher, data, steps=args.steps, batch_size=args.batch, grad_accumulation=1, learning_rate=1e-4,
            rank=args.rank, alpha=float(args.rank), adapter="lora",
            targets="all_linear" if args.variant == "dojo_all" else "auto", optimizer="adamw",
            lr_schedule="constant", warmup_steps=0, timestep_sampling="auto", shift=0.0, min_snr_gamma=0.0,
            noise_offset=0.0, gradient_checkpointing=args.checkpointing, precision="bf16", seed=0,
            checkpoint_every=0, run_name="bench")
    elif args.variant.startswith("builtin"):
        import comfy_extras.nodes_train as nodes_train
        node = nodes_train.TrainLoraNode
        schema = {i.id: i for i in node.GET_SCHEMA().inputs}
        if args.variant == "builtin_bypass" and "bypass_mode" not in schema:
            return {"skipped": "this ComfyUI's TrainLoraNode has no bypass mode"}
        positive = [[[context[i:i + 1].clone(), {} if pooled is None else {"pooled_output": pooled[i:i + 1].clone()}]]
                    for i in range(n)]
        kwargs = dict(model=[patcher], latents=[{"samples": latents}], positive=positive,
                      batch_size=[args.batch], steps=[args.steps], grad_accumulation_steps=[1],
                      learning_rate=[1e-4], rank=[args.rank], optimizer=["AdamW"], loss_function=["MSE"],
                      seed=[0], training_dtype=["bf16"], lora_dtype=["bf16"], quantized_backward=[False],
                      algorithm=[schema["algorithm"].default] if "algorithm" in schema else None,
                      gradient_checkpointing=[checkpointing], checkpoint_depth=[1], offloading=[False],
                      existing_lora=["[None]"], bucket_mode=[False], bypass_mode=[args.variant == "builtin_bypass"])
        node.execute(**{k: v for k, v in kwargs.items() if k in schema})
    else:
        bc.floor_steps(pack, patcher, family, latents, context, pooled, args.batch, args.steps, checkpointing,
                       on_step=on_step)
    intervals = [b - a for a, b in zip(times, times[1:])][1:]  # the first two steps are warm-up
    cpu = [b - a for a, b in zip(cpu_times, cpu_times[1:])][1:]
    if not intervals:
        raise RuntimeError(f"only {len(times)} steps were timed; use --steps 4 or more")
    sys_s = [b - a for a, b in zip(sys_times, sys_times[1:])][1:]
    return {"comfyui": version, "s_per_step": statistics.median(cpu), "wall_s_per_step": statistics.median(intervals),
            "sys_s_per_step": statistics.median(sys_s),
            "steps_timed": len(intervals),
            "trainable": trainable.get("n", 0), "peak_rss_mb": bc.rss_mb(),
            "training_mb": bc.rss_mb() - rss_before}


def run_child(args, family, checkpointing, variant) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--family", family, "--checkpointing", checkpointing,
           "--steps", str(args.steps), "--batch", str(args.batch), "--rank", str(args.rank),
           "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"failed": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1][7:])


def ratio(rounds, a, b, key="s_per_step"):
    """Median over rounds of the per-round ratio a/b (rounds where both ran)."""
    values = [r[a][key] / r[b][key] for r in rounds if key in r.get(a, {}) and key in r.get(b, {})]
    return (statistics.median(values), values) if values else (None, [])


def best_builtin(rounds):
    """Per round, the faster of the built-in's two configurations, as a pseudo-variant 'builtin_best'."""
    for row in rounds:
        got = [row[v] for v in ("builtin_bypass", "builtin") if "s_per_step" in row.get(v, {})]
        if got:
            row["builtin_best"] = min(got, key=lambda r: r["s_per_step"])
    return rounds


def fmt_ratio(rounds, a, b, key="s_per_step"):
    med, values = ratio(rounds, a, b, key)
    if med is None:
        return "-"
    return f"{med:.2f}x ({', '.join(f'{v:.2f}' for v in values)})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(bc.FAMILIES))
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    bc.add_run_options(parser)
    args = parser.parse_args()
    bc.apply_run_options(args)
    if args.variant:
        print("RESULT " + json.dumps(child(args)))
        return
    families, settings = args.families.split(","), args.checkpointing.split(",")
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    configs = [(f, c) for f in families for c in settings]
    results = {cfg: [] for cfg in configs}   # cfg -> [round: {variant: result}]
    loads = {cfg: [] for cfg in configs}
    version = None
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds}: load average {os.getloadavg()[0]:.2f}", flush=True)
        for cfg in configs:
            loads[cfg].append(os.getloadavg()[0])
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]  # rotate within the pair set
            row = {}
            for variant in order:
                row[variant] = run_child(args, *cfg, variant)
                version = row[variant].get("comfyui", version)
            results[cfg].append(row)
            print(f"  {cfg[0]:<14} ckpt {cfg[1]:<3} load {loads[cfg][-1]:.2f}: " + "  ".join(
                f"{v} {r['s_per_step']:.3f}" if "s_per_step" in r else f"{v} {r.get('skipped') or 'FAILED: ' + r.get('failed', '')}"
                for v, r in row.items()), flush=True)

    print(f"\nComfyUI {version}, width {args.width}, malloc {args.malloc}, {args.threads} thread(s), bf16, batch {args.batch}, rank {args.rank}, "
          f"{args.steps} steps per process ({args.steps - 2} timed), {args.rounds} rounds")
    print(f"\n{'family':<14}{'ckpt':<5}{'variant':<16}{'cpu s':>8}{'sys s':>8}{'wall s':>8}{'peak RSS':>10}{'train MB':>10}"
          f"{'trainable':>11}  load per round")
    for cfg in configs:
        for variant in variants:
            got = [r[variant] for r in results[cfg] if "s_per_step" in r.get(variant, {})]
            if not got:
                why = next((r[variant].get("skipped") or r[variant].get("failed") for r in results[cfg]), "")
                print(f"{cfg[0]:<14}{cfg[1]:<5}{variant:<16}  {why}")
                continue
            med = lambda key: statistics.median(g[key] for g in got)  # noqa: E731
            print(f"{cfg[0]:<14}{cfg[1]:<5}{variant:<16}{med('s_per_step'):>8.3f}{med('sys_s_per_step'):>8.3f}"
                  f"{med('wall_s_per_step'):>8.3f}"
                  f"{med('peak_rss_mb'):>10.0f}"
                  f"{med('training_mb'):>10.0f}{got[0]['trainable']:>11,}  "
                  + " ".join(f"{x:.1f}" for x in loads[cfg]))
    print("\nPaired ratios of CPU s/step (peak RSS for the last column): median over rounds (per-round values)")
    print(f"{'family':<14}{'ckpt':<5}{'dojo/floor':<26}{'dojo_all/floor':<26}{'dojo/builtin_bypass':<26}"
          f"{'dojo/builtin':<26}{'dojo/best builtin':<26}{'dojo/bypass peak RSS':<24}")
    for cfg in configs:
        rounds = best_builtin(results[cfg])
        print(f"{cfg[0]:<14}{cfg[1]:<5}{fmt_ratio(rounds, 'dojo', 'floor'):<26}{fmt_ratio(rounds, 'dojo_all', 'floor'):<26}"
              f"{fmt_ratio(rounds, 'dojo', 'builtin_bypass'):<26}{fmt_ratio(rounds, 'dojo', 'builtin'):<26}"
              f"{fmt_ratio(rounds, 'dojo', 'builtin_best'):<26}"
              f"{fmt_ratio(rounds, 'dojo', 'builtin_bypass', 'peak_rss_mb'):<24}")


if __name__ == "__main__":
    main()
