"""Where Dojo's training step spends its time beyond the frozen floor, one layer at a time.

Per family (bench_common.FAMILIES; one fresh process each, variants interleaved within it for --rounds
rounds, median of the timed steps of each):

  floor      frozen forward + backward (gradient w.r.t. the input latents), residual adds out of place,
             torch's checkpoint around the blocks when checkpointing is on
  +adapters  the same with Dojo's peft LoRA layers attached (family default targets, rank 16), gradients
             into them instead of the latents: the cost of the adapter layers
  +dojo      the same inside Dojo's training region instead (copy-on-write protection of saved tensors
             for Flux-style models, Dojo's block checkpointing): the cost of the gradient protection and
             of Dojo's recomputation
  full       Dojo Train LoRA itself: adds the optimizer (AdamW, grad clipping), timestep and noise
             sampling, batch collation, the loss and the per-step Python work of the loop

and a torch.profiler count of the ops that mark copies and recomputation (per step) in each.

    OMP_NUM_THREADS=1 python bench/bench_step_phases.py [--families sd15,flux] [--checkpointing off,on]
        [--rounds 3] [--steps 5]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import bench_common as bc

PHASES = ("floor", "+adapters", "+dojo", "full")
COUNTED = ("aten::copy_", "aten::clone", "aten::convolution", "aten::mm", "aten::addmm", "aten::bmm")


def child(family: str, checkpointing: bool, rounds: int, steps: int, profile_steps: int, top_ops: int) -> dict:
    import torch
    version, pack = bc.boot()
    torch.set_num_threads(1)
    cc, cm = pack("nodes.comfy_compat"), pack("nodes.comfy_model")
    adapters = pack("training.adapters")
    protection = pack("nodes.grad_protection")
    latents, context, pooled = bc.inputs(family, 4)
    patcher = bc.build_patcher(family)
    cond = bc.conditioning(pack, family, context[:1].clone(), None if pooled is None else pooled[:1].clone())

    def adapter_steps(n, dojo_region, on_step):
        with torch.inference_mode(False), torch.enable_grad():
            clone = cc.training_clone(patcher)
            cc.load_for_compute(clone)
            cc.materialize_inference_tensors(clone.model)
            view = cm.ComfyDenoisingModel(clone)
            preset = view.spec.recipe.targets
            adapter = adapters.attach_adapter(view.diffusion_model, view.adaptable_modules(preset),
                                              adapters.AdapterConfig(rank=16, alpha=16.0), seed=0)
            adapter.let_autocast_cast_inputs(True)
            region = protection.training_region(clone, checkpointing) if dojo_region \
                else bc.floor_region(pack, clone, checkpointing)
            g = torch.Generator().manual_seed(1)
            try:
                with region:
                    for _ in range(n):
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            out = view.predict(latents[:1].clone(), torch.rand(1, generator=g), cond)
                        out.float().pow(2).mean().backward()
                        for p in adapter.parameters():
                            p.grad = None
                        on_step()
            finally:
                adapter.detach()

    def full_steps(n, on_step):
        from torch.optim.optimizer import register_optimizer_step_post_hook
        batches, encoded, train_lora = pack("training.batches"), pack("training.encoded"), pack("nodes.train_lora")
        samples = [batches.Sample(latents[i], bc.conditioning(pack, family, context[i:i + 1].clone(),
                                                               None if pooled is None else pooled[i:i + 1].clone()))
                   for i in range(4)]
        handle = register_optimizer_step_post_hook(lambda *a, **k: on_step())
        try:
            train_lora.DojoTrainLoRA.execute(
                patcher, encoded.EncodedDataset(samples, ["x"] * 4), steps=n, batch_size=1, grad_accumulation=1,
                learning_rate=1e-4, rank=16, alpha=16.0, adapter="lora", targets="auto", optimizer="adamw",
                lr_schedule="constant", warmup_steps=0, timestep_sampling="auto", shift=0.0, min_snr_gamma=0.0,
                noise_offset=0.0, gradient_checkpointing="on" if checkpointing else "off", precision="bf16",
                seed=0, checkpoint_every=0, run_name="phases")
        finally:
            handle.remove()

    def run(phase, n, on_step):
        if phase == "floor":
            bc.floor_steps(pack, patcher, family, latents, context, pooled, 1, n, checkpointing, on_step=on_step)
        elif phase == "full":
            full_steps(n, on_step)
        else:
            adapter_steps(n, phase == "+dojo", on_step)

    def timed(phase):  # CPU time of this process per step (one thread): robust to other load
        stamps = []
        run(phase, steps, lambda: stamps.append(time.process_time()))
        return statistics.median([b - a for a, b in zip(stamps, stamps[1:])][1:])

    times = {p: [] for p in PHASES}
    for rnd in range(rounds):
        order = PHASES[rnd % len(PHASES):] + PHASES[:rnd % len(PHASES)]
        for phase in order:
            times[phase].append(timed(phase))
    counts = {}
    for phase in PHASES:
        # Profile whole steps only (from the end of step 1 to the end of step 1 + profile_steps), not the
        # one-off setup (weight copies, adapter attach) around them.
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        done = []

        def window():
            done.append(1)
            if len(done) == 1:
                prof.start()
            elif len(done) == 1 + profile_steps:
                prof.stop()
        run(phase, 2 + profile_steps, window)
        events = {e.key: e for e in prof.key_averages()}
        counts[phase] = {k: events[k].count / profile_steps for k in COUNTED if k in events}
        optimizer = [e for k, e in events.items() if k.startswith("Optimizer.step")]
        counts[phase]["optimizer_ms"] = sum(e.cpu_time_total for e in optimizer) / 1000 / profile_steps
        top = sorted(events.values(), key=lambda e: -e.self_cpu_time_total)[:top_ops]
        counts[phase]["top"] = [(e.key, e.count / profile_steps, e.self_cpu_time_total / 1000 / profile_steps)
                                for e in top]
    return {"comfyui": version, "times": times, "counts": counts, "load": os.getloadavg()[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(bc.FAMILIES))
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=0, help="also list the N ops with the most self CPU time")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    bc.add_run_options(parser)
    args = parser.parse_args()
    bc.apply_run_options(args)
    if args.child:
        family, ckpt = args.child.split(":")
        print("RESULT " + json.dumps(child(family, ckpt == "on", args.rounds, args.steps, args.profile_steps,
                                           args.top)))
        return
    print(f"width: {args.width}, malloc: {args.malloc}")
    print(f"{'family':<14}{'ckpt':<5}" + "".join(f"{p:>11}" for p in PHASES)
          + f"{'adapters':>10}{'protect/ckpt':>14}{'optim+loop':>12}{'total':>8}  load  (CPU s/step; phase costs as % of floor)")
    rows = []
    for family in args.families.split(","):
        for ckpt in args.checkpointing.split(","):
            proc = subprocess.run([sys.executable, __file__, "--child", f"{family}:{ckpt}", "--rounds", str(args.rounds),
                                   "--steps", str(args.steps), "--profile-steps", str(args.profile_steps),
                                   "--top", str(args.top)],
                                  capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                print(f"{family:<14}{ckpt:<5} FAILED: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}")
                continue
            r = json.loads(lines[-1][7:])
            med = {p: statistics.median(r["times"][p]) for p in PHASES}
            pct = lambda a, b: 100 * (med[a] - med[b]) / med["floor"]  # noqa: E731
            print(f"{family:<14}{ckpt:<5}" + "".join(f"{med[p]:>11.3f}" for p in PHASES)
                  + f"{pct('+adapters', 'floor'):>+9.0f}%{pct('+dojo', '+adapters'):>+13.0f}%"
                  f"{pct('full', '+dojo'):>+11.0f}%{med['full'] / med['floor']:>7.2f}x  {r['load']:.1f}", flush=True)
            rows.append((family, ckpt, r))
    print("\nOps per step (torch.profiler) and optimizer time")
    print(f"{'family':<14}{'ckpt':<5}{'phase':<11}" + "".join(f"{k.split('::')[1]:>12}" for k in COUNTED) + f"{'optim ms':>10}")
    for family, ckpt, r in rows:
        for phase in PHASES:
            c = r["counts"][phase]
            print(f"{family:<14}{ckpt:<5}{phase:<11}" + "".join(f"{c.get(k, 0):>12.0f}" for k in COUNTED)
                  + f"{c['optimizer_ms']:>10.1f}")
            for key, count, ms in c["top"]:
                print(f"{'':<30}{key[:48]:<50}{count:>8.0f} calls {ms:>9.1f} ms")


if __name__ == "__main__":
    main()
