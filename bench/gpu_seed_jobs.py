"""The seed jobs at real size on one CUDA GPU, inside real ComfyUI: peak memory against the memory
planner's estimate, and speed. Random weights (ComfyUI's own classes and configs, as
bench/memory_real_size.py builds them), a few steps each; under 10 minutes on one modern GPU.

Jobs: Flux.1 [dev] LoRA 1024 px rank 16; HunyuanVideo LoRA 512x512x33 rank 32; SDXL LoRA 1024 px rank 16
(bf16 weights, each in a fresh subprocess so peaks do not mix) through Dojo Train LoRA with
memory_plan 'auto', and ComfyUI's built-in TrainLoraNode on the same model and batch where it runs.
SD1.5 textual inversion is planned by the same code path (nodes/ti_training.py) and needs the CLIP;
it runs in tests/integration/test_memory_plan.py on the CPU.

Per job: torch.cuda.max_memory_allocated over training (reset just before), the planner's estimate
(weights + adapter + optimizer + measured step peak + workspace) and their ratio, s/step (median after
the first step), what the plan chose; and the built-in's peak and s/step.

Usage (on the GPU machine): COMFYUI_PATH=~/ComfyUI python bench/gpu_seed_jobs.py [--steps 4] [--only flux]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

JOB_NAMES = ("flux", "hunyuan_video", "sdxl")


def boot_gpu():
    sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
    sys.path.insert(0, os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI")))
    import comfy.options  # noqa: F401
    import importlib.util
    spec = importlib.util.spec_from_file_location("comfyui_dojo", HERE.parent / "__init__.py",
                                                  submodule_search_locations=[str(HERE.parent)])
    sys.modules["comfyui_dojo"] = module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:
        pass


def build(family: str):
    """A real-size random-weight ModelPatcher on the GPU, bf16, and one sample of the seed job."""
    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from memory_real_size import JOBS
    config_name, unet, latent, tokens, width, pooled, rank, targets, label = JOBS[family]
    config = getattr(comfy.supported_models, config_name)(dict(unet))
    config.set_inference_dtype(torch.bfloat16, None)
    device = comfy.model_management.get_torch_device()
    with torch.inference_mode():
        model = config.get_model({}, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        for p in model.diffusion_model.parameters():
            p.normal_(0, 0.02, generator=g)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                               offload_device=comfy.model_management.unet_offload_device())
    batches = importlib.import_module("comfyui_dojo.training.batches")
    encoded = importlib.import_module("comfyui_dojo.training.encoded")
    protocol = importlib.import_module("comfyui_dojo.training.protocol")
    gc = torch.Generator().manual_seed(0)
    extra = {"guidance": 1.0} if family in ("flux", "hunyuan_video") else {}
    cond = protocol.Conditioning(torch.randn(1, tokens, width, generator=gc),
                                 None if pooled is None else torch.randn(1, pooled, generator=gc), extra)
    data = encoded.EncodedDataset([batches.Sample(torch.randn(*latent, generator=gc), cond)], [label])
    return patcher, data, rank, targets, label


def run_dojo(family: str, steps: int) -> dict:
    import torch
    boot_gpu()
    patcher, data, rank, targets, label = build(family)
    lt = importlib.import_module("comfyui_dojo.nodes.lora_training")
    planning = importlib.import_module("comfyui_dojo.nodes.memory_planning")
    adapters = importlib.import_module("comfyui_dojo.training.adapters")
    loop = importlib.import_module("comfyui_dojo.training.loop")
    protocol = importlib.import_module("comfyui_dojo.training.protocol")
    times = []
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(lambda *a, **k: (torch.cuda.synchronize(), times.append(time.perf_counter())))
    job = lt.LoraJob(adapter=adapters.AdapterConfig(rank=rank, alpha=rank), targets=protocol.TargetPreset(targets),
                     train=loop.TrainConfig(steps=steps, learning_rate=1e-4, seed=0),
                     gradient_checkpointing=True, memory_plan=planning.PlanRequest())
    torch.cuda.reset_peak_memory_stats()
    result = lt.train_lora(patcher, data, job)
    peak = torch.cuda.max_memory_allocated()
    p = result.memory_plan
    return {"job": label, "peak": peak, "estimate": p.estimate.total, "summary": p.summary(),
            "s_per_step": statistics.median([b - a for a, b in zip(times, times[1:])]) if len(times) > 1 else None}


def run_builtin(family: str, steps: int) -> dict:
    import torch
    boot_gpu()
    patcher, data, rank, _, label = build(family)
    import nodes as comfy_nodes
    node = comfy_nodes.NODE_CLASS_MAPPINGS.get("TrainLoraNode")
    if node is None:
        return {"job": label, "error": "no TrainLoraNode in this ComfyUI"}
    sample = data.samples[0]
    schema = {i.id: i for i in node.GET_SCHEMA().inputs}
    kwargs = dict(model=[patcher], latents=[{"samples": sample.latent[None]}],
                  positive=[[[sample.cond.context, {"pooled_output": sample.cond.pooled, **sample.cond.extra}]]],
                  batch_size=[1], steps=[steps], grad_accumulation_steps=[1], learning_rate=[1e-4], rank=[rank],
                  optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=["bf16"],
                  lora_dtype=["bf16"], quantized_backward=[False], algorithm=[schema["algorithm"].default]
                  if "algorithm" in schema else ["lora"], gradient_checkpointing=[True], checkpoint_depth=[1],
                  offloading=[False], existing_lora=["[None]"], bucket_mode=[False], bypass_mode=[False])
    times = []
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(lambda *a, **k: (torch.cuda.synchronize(), times.append(time.perf_counter())))
    torch.cuda.reset_peak_memory_stats()
    try:
        node.execute(**{k: v for k, v in kwargs.items() if k in schema})
    except Exception as e:  # e.g. out of memory: reported, not hidden
        return {"job": label, "error": f"{type(e).__name__}: {str(e)[:120]}"}
    return {"job": label, "peak": torch.cuda.max_memory_allocated(),
            "s_per_step": statistics.median([b - a for a, b in zip(times, times[1:])]) if len(times) > 1 else None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", nargs="*", default=list(JOB_NAMES))
    parser.add_argument("--one", nargs=2, metavar=("WHO", "FAMILY"))
    opts = parser.parse_args()
    if opts.one:
        who, family = opts.one
        print(json.dumps((run_dojo if who == "dojo" else run_builtin)(family, opts.steps)))
        return
    gb = 1e9
    print(f"{'job':<36}{'Dojo peak GB':>13}{'estimate GB':>12}{'est/peak':>9}{'s/step':>8}  plan"
          f"{'':<44}{'built-in peak GB':>17}{'s/step':>8}")
    for family in opts.only:
        rows = {}
        for who in ("dojo", "builtin"):
            out = subprocess.run([sys.executable, __file__, "--one", who, family, "--steps", str(opts.steps)],
                                 capture_output=True, text=True, timeout=300)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            rows[who] = json.loads(lines[-1]) if lines else {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
        d, b = rows["dojo"], rows["builtin"]
        if "error" in d:
            print(f"{family:<36} Dojo failed: {d['error']}")
            continue
        built = f"{b['peak'] / gb:>17.1f}{b['s_per_step'] or 0:>8.2f}" if "peak" in b else f"  built-in: {b['error']}"
        print(f"{d['job']:<36}{d['peak'] / gb:>13.1f}{d['estimate'] / gb:>12.1f}{d['estimate'] / d['peak']:>9.2f}"
              f"{d['s_per_step'] or 0:>8.2f}  {d['summary']:<48}{built}", flush=True)


if __name__ == "__main__":
    main()
