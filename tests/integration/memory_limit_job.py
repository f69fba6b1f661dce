"""A training process for test_memory_plan.py's real-memory-limit test (not a test itself).

Boots ComfyUI (path in argv[1]), builds ComfyUI's HunyuanVideo network (hidden 256, 6 + 6 blocks) and a
33-frame 256 px clip, where the activations of a step without checkpointing dominate, prints one JSON line {"ready": ..., "vmsize", "on", "off", "weights"} (the
planner's estimates with checkpointing on and off), then waits for a line on stdin: the parent sets an
address-space limit on this process (prlimit) meanwhile. Then it runs the scenarios named on that line,
in order, printing one JSON line each: what the planner decided, whether training finished, the error.
"""
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def boot(comfy_root: str):
    sys.path[:0] = [str(HERE), str(HERE.parent), comfy_root]
    import comfy.options  # noqa: F401
    from comfy.cli_args import args
    args.cpu = True
    import pack_import  # noqa: F401  (comfyui_dojo = this checkout, as in the tests)


def vmsize() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def main():
    # An address-space limit from the start (far above anything used; the parent lowers it with prlimit):
    # under one the planner estimates without replaying steps through malloc (MallocReplay.create), so
    # the estimates printed below and those made under the real limit are made the same way.
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (2 ** 40, resource.getrlimit(resource.RLIMIT_AS)[1]))
    boot(sys.argv[1])
    import importlib
    import torch
    torch.set_num_threads(1)
    import inprocess_models
    import tiny_comfy_models as tiny
    lt = importlib.import_module("comfyui_dojo.nodes.lora_training")
    mp = importlib.import_module("comfyui_dojo.nodes.memory_planning")
    mn = importlib.import_module("comfyui_dojo.nodes.memory_nodes")
    adapters = importlib.import_module("comfyui_dojo.training.adapters")
    batches = importlib.import_module("comfyui_dojo.training.batches")
    encoded = importlib.import_module("comfyui_dojo.training.encoded")
    loop = importlib.import_module("comfyui_dojo.training.loop")
    protocol = importlib.import_module("comfyui_dojo.training.protocol")
    import peft.tuners.lora  # noqa: F401

    patcher = inprocess_models._patcher("HunyuanVideo", dict(tiny.HUNYUAN_VIDEO_TINY, depth=6, depth_single_blocks=6),
                                        seed=0)
    g = torch.Generator().manual_seed(0)
    cond = protocol.Conditioning(torch.randn(1, 32, 768, generator=g), torch.randn(1, 768, generator=g),
                                 {"guidance": 1.0})
    data = encoded.EncodedDataset([batches.Sample(torch.randn(16, 9, 32, 32, generator=g), cond)], ["a clip"])

    def job(checkpointing, plan, steps=2):
        return lt.LoraJob(adapter=adapters.AdapterConfig(rank=16, alpha=16),
                          targets=protocol.TargetPreset.ATTENTION_MLP,
                          train=loop.TrainConfig(steps=steps, learning_rate=1e-4, seed=0),
                          gradient_checkpointing=checkpointing, memory_plan=plan)

    estimates = {}
    for gc in ("on", "off"):
        _, figures = mn.estimate_lora_memory(patcher, data, batch_size=1, rank=16, targets="attention_mlp",
                                             adapter="lora", optimizer="adamw", gradient_checkpointing=gc,
                                             blocks_to_swap=0, precision="bf16")
        estimates[gc] = figures["estimate"]
    weights = sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())
    # A real (warm-up) step first, so the limit is set on a process that has already run one.
    lt.train_lora(patcher, encoded.EncodedDataset([batches.Sample(torch.randn(16, 1, 8, 8), cond)], ["x"]),
                  job(False, None, steps=1))
    print(json.dumps({"ready": True, "vmsize": vmsize(), "weights": weights, **estimates}), flush=True)

    scenarios = sys.stdin.readline().split()
    for name in scenarios:
        plan = {"auto": mp.PlanRequest(True, False), "explicit_off": mp.PlanRequest(False, False),
                "unplanned_off": None}[name]
        out = {"scenario": name}
        try:
            result = lt.train_lora(patcher, data, job(False, plan))
            out.update(finished=result.steps_done, checkpointing=result.memory_plan.checkpointing
                       if result.memory_plan else None, summary=result.memory_plan.summary()
                       if result.memory_plan else None)
        except Exception as e:  # what the test asserts on: the kind of error and its message
            out.update(error=type(e).__name__, message=str(e),
                       steps_before=getattr(e, "step", None))
        print(json.dumps(out), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
