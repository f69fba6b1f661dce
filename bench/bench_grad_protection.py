"""Cost of the gradient protection (issue 11) on ComfyUI's own Flux / HunyuanVideo blocks (CPU).

Each variant runs in a fresh subprocess (peak RSS is per process): a few warm-up steps, then timed
forward+backward steps of a LoRA-like delta on a tiny ComfyUI network.

  floor          residual adds made out of place by patching Tensor.__iadd__ in the benchmark process
                 (what hand-written out-of-place blocks would cost; no protection)
  floor+ckpt     the same, with torch's non-reentrant checkpoint per block (correct once out of place)
  protected      protected_comfy_training(checkpointing=False): copy-on-write saved tensors
  protected+ckpt protected_comfy_training(checkpointing=True)
  clone-all      every saved tensor copied (the tests' reference)

Columns: median s/step; the process's peak RSS; "training MB" = peak RSS minus RSS after the model was
built (what the training steps added: activations, saved tensors, grads); gradient difference from the
floor (max abs difference / max abs floor gradient over the LoRA tensors).

Usage: COMFYUI_PATH=/root/ComfyUI python bench/bench_grad_protection.py [--hidden 256] [--side 32] [--steps 5]
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
VARIANTS = ("floor", "floor+ckpt", "protected", "protected+ckpt", "clone-all")


def boot(comfy_root: str):
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    sys.path.insert(0, comfy_root)
    import comfy.options  # noqa: F401
    from comfy.cli_args import args
    args.cpu = True
    import importlib.util
    spec = importlib.util.spec_from_file_location("comfyui_dojo", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    sys.modules["comfyui_dojo"] = module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:
        pass  # the V3 entrypoint may want a booted server; the submodules below are what we use
    import importlib
    return (importlib.import_module("comfyui_dojo.nodes.grad_protection"),
            importlib.import_module("comfyui_dojo.nodes.comfy_compat"),
            importlib.import_module("comfyui_dojo.training.grad_safety"))


def run_variant(variant: str, family: str, hidden: int, side: int, steps: int) -> dict:
    import contextlib
    import torch
    import torch.utils.checkpoint
    protection, compat, safety = boot(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI")))
    import tiny_comfy_models as tiny
    heads = hidden // 32
    axes = [8, 12, 12]
    overrides = dict(hidden_size=hidden, num_heads=heads, axes_dim=axes)
    tiny.FLUX_TINY_NET.update(overrides)
    tiny.HUNYUAN_VIDEO_TINY_NET.update(overrides)
    net = tiny.build_tiny_flux() if family == "flux" else tiny.build_tiny_hunyuan_video_net()
    g = torch.Generator().manual_seed(0)
    loras = []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(("img_attn.qkv", "txt_attn.qkv", "linear1", "linear2")):
            a = (torch.randn(m.in_features, 8, generator=g) * 0.1).requires_grad_()
            b = (torch.randn(8, m.out_features, generator=g) * 0.1).requires_grad_()
            loras += [a, b]
            m.register_forward_hook(lambda mod, inp, out, a=a, b=b: out + (inp[0] @ a) @ b)
    (x, t, context), kwargs = tiny.tiny_inputs(family)
    shape = (1, 16, side, side) if family == "flux" else (1, 16, 2, side, side)
    x = torch.randn(shape, generator=g)
    subs = compat.rope_substitutions()
    blocks = protection.transformer_blocks(net)

    if variant.startswith("floor"):
        torch.Tensor.__iadd__ = lambda self, other: self + other  # benchmark process only
        if variant == "floor+ckpt":
            def run(fwd, args, kw):
                with safety.op_substitutions(subs):
                    return fwd(*args, **kw)
            for block in blocks:
                fwd = block.forward
                block.forward = lambda *a, _f=fwd, **k: torch.utils.checkpoint.checkpoint(run, _f, a, k, use_reentrant=False)
        context_fn = lambda: safety.op_substitutions(subs)
    elif variant == "protected":
        context_fn = lambda: protection.protected_comfy_training(net, checkpointing=False)
    elif variant == "protected+ckpt":
        context_fn = lambda: protection.protected_comfy_training(net, checkpointing=True)
    else:
        context_fn = lambda: safety.clone_all_saved_tensors(subs)

    def step():
        for p in loras:
            p.grad = None
        with context_fn():
            loss = (net(x, t, context, **kwargs) ** 2).mean()
            loss.backward()
        return [p.grad.clone() for p in loras]

    torch.set_num_threads(1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        grads = step()
        times.append(time.perf_counter() - start)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    return {"s_per_step": times[len(times) // 2], "peak_rss_mb": rss_peak / 1024,
            "train_rss_mb": (rss_peak - rss_before) / 1024, "grads": [g.flatten()[:2048].tolist() for g in grads]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant")
    parser.add_argument("--family")
    opts = parser.parse_args()
    if opts.variant:
        print(json.dumps(run_variant(opts.variant, opts.family, opts.hidden, opts.side, opts.steps)))
        return
    import math
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"ComfyUI {os.environ.get('COMFYUI_PATH', '~/ComfyUI')}; hidden {opts.hidden}, latent {opts.side}x{opts.side}, "
          f"median of {opts.steps} steps, 1 thread")
    print(f"{'family':<14}{'variant':<16}{'s/step':>9}{'peak RSS MB':>13}{'training MB':>13}{'grad err vs floor':>19}")
    for family in ("flux", "hunyuan_video"):
        floor = None
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--family", family,
                                  "--hidden", str(opts.hidden), "--side", str(opts.side), "--steps", str(opts.steps)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"{family:<14}{variant:<16} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if floor is None:
                floor = r["grads"]
            err = max(max(abs(a - b) for a, b in zip(g, f)) / (max(abs(b) for b in f) or 1.0)
                      for g, f in zip(r["grads"], floor))
            print(f"{family:<14}{variant:<16}{r['s_per_step']:>9.3f}{r['peak_rss_mb']:>13.0f}{r['train_rss_mb']:>13.0f}"
                  f"{err:>19.1e}")


if __name__ == "__main__":
    main()
