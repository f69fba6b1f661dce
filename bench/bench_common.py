"""What the training benchmarks share: booting ComfyUI on the CPU with this checkout's pack, the tiny
stand-in models of each family (ComfyUI's own classes, random weights, built in process), their
inputs, and the frozen "floor" step every trainer is compared with.

Two sizes, chosen by DOJO_BENCH_WIDTH (the benchmarks' --width sets it for their children):

  tiny  (default) hidden 256 transformers with 2+2 blocks, 64-channel UNets, fp32 weights: one bf16 step
        takes ~0.05-0.5 s on one CPU thread, so many fresh-process rounds fit in minutes. At this width a
        rank-16 LoRA is a large part of each layer's work, and per-op Python costs weigh more than on
        a real model.
  real  the real models' layer widths with fewer blocks, bf16 weights as users load them: Flux.1 /
        HunyuanVideo hidden 3072 with 24 heads and 1 double + 1 single block; SD1.5's 320 / 640 channels
        with 8 heads; SDXL's 320 / 640 channels with its 2-deep transformers at 640, context 2048. Each
        layer costs what it costs in the real model, so per-layer ratios (adapter, protection,
        checkpointing) are the real ones; ~1-4 s per step.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import resource
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# family -> latent shape per sample, text context [L, D], pooled width (None: no pooled output)
FAMILIES = {
    "sd15": ((4, 32, 32), (77, 768), None),
    "sdxl": ((4, 32, 32), (77, 2048), 1280),
    "flux": ((16, 32, 32), (64, 48), 32),
    "hunyuan_image": ((16, 1, 32, 32), (64, 48), 32),
    "hunyuan_video": ((16, 5, 32, 32), (64, 48), 32),   # a 5-latent-frame clip
}
TRANSFORMER_WIDTH = dict(hidden_size=256, num_heads=4, axes_dim=[8, 28, 28])
WIDTH = os.environ.get("DOJO_BENCH_WIDTH", "tiny")
if WIDTH not in ("tiny", "real"):
    raise SystemExit(f"DOJO_BENCH_WIDTH must be tiny or real, not {WIDTH!r}")
if WIDTH == "real":
    TRANSFORMER_WIDTH = dict(hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], depth=1, depth_single_blocks=1)
    FAMILIES = dict(FAMILIES, hunyuan_video=((16, 5, 16, 16), (64, 48), 32))  # 320 video tokens, as many as 512 px


def malloc_env(mode: str) -> dict:
    """Environment for the children's glibc allocator. "default": as is. "steady": freed memory stays in
    the heap (no trimming, mmap only above 32 MB), the same for every variant. With glibc's default the
    memory a step frees is partly given back to the system and faulted in again by the next step: on these
    CPU runs that is 50-140 ms of system time per HunyuanVideo clip step and varies with each trainer's
    allocation pattern and the heap's history, not with its training code (on a GPU, activations never
    touch glibc). "steady" takes it out of the comparison; the tables print system time either way."""
    if mode == "steady":
        return {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
    return {}


def add_run_options(parser) -> None:
    """The options every benchmark passes on to its children: --width and --malloc."""
    parser.add_argument("--width", choices=("tiny", "real"), default=WIDTH,
                        help="model widths (bench_common): tiny stand-ins, or the real layer widths with fewer blocks")
    parser.add_argument("--malloc", choices=("default", "steady"), default="default",
                        help="glibc's allocator as is, or told to keep freed memory (bench_common.malloc_env)")


def apply_run_options(args) -> None:
    """Put --width and --malloc into the environment the children start with (they build their models from it)."""
    os.environ["DOJO_BENCH_WIDTH"] = args.width
    os.environ.update(malloc_env(args.malloc))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def boot():
    """Import ComfyUI ($COMFYUI_PATH, default ~/ComfyUI) in CPU mode and this checkout's pack as
    `comfyui_dojo`; returns (ComfyUI version, pack module accessor)."""
    root = Path(os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI"))).expanduser()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    sys.path[:0] = [str(root), str(REPO / "tests" / "integration"), str(REPO / "tests")]
    import comfy.options  # noqa: F401
    from comfy.cli_args import args
    args.cpu = True
    base = Path(tempfile.mkdtemp(prefix="dojo-bench-"))  # checkpoints and outputs go here, not into ComfyUI
    for sub in ("models", "input", "output", "temp", "user"):
        (base / sub).mkdir()
    atexit.register(shutil.rmtree, base, True)
    args.base_directory = str(base)
    import comfyui_version
    import pack_import  # noqa: F401  (comfyui_dojo = this checkout)
    import importlib

    def pack(name: str):
        return importlib.import_module(f"comfyui_dojo.{name}")
    return comfyui_version.__version__, pack


def build_patcher(family: str, seed: int = 0, disable_dynamic: bool = False):
    """A ComfyUI ModelPatcher of the family, as its loaders return it (inference-tensor weights), with
    the reload factory ComfyUI's loaders register (0.33's TrainLoraNode deep-copies through it)."""
    patcher = _build_patcher(family, seed)
    patcher.cached_patcher_init = (_reload_patcher, (family, seed))
    return patcher


def _reload_patcher(family: str, seed: int, disable_dynamic: bool = False):
    """What ComfyUI's reload factory gives a caller outside inference mode (0.33's TrainLoraNode deep-copies
    the model inside `inference_mode(False)`): the same weights as ordinary tensors, not inference tensors."""
    import torch
    patcher = build_patcher(family, seed)
    if not torch.is_inference_mode_enabled():
        patcher.model._apply(lambda t: t.clone())
    return patcher


def _build_patcher(family: str, seed: int):
    import torch
    import inprocess_models
    import tiny_comfy_models as tiny
    import tiny_files
    real = WIDTH == "real"
    dtype = torch.bfloat16 if real else torch.float32
    if family == "sd15":
        if not real:
            return inprocess_models.tiny_sd15_patcher(seed, model_channels=64)
        config = inprocess_models.tiny_sd15_config(model_channels=320)
        return inprocess_models._patcher("SD15", dict(config, num_heads=8, transformer_depth=[1, 1],
                                                      transformer_depth_output=[1, 1, 1, 1]), seed, dtype)
    if family == "sdxl":
        if not real:
            return tiny_files.build_tiny_sdxl(seed)
        return inprocess_models._patcher("SDXL", dict(tiny_files.SDXL_TINY_UNET, model_channels=320, num_head_channels=64, num_heads=-1,
                                                      transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2]),
                                         seed, dtype)
    if family == "flux":
        return inprocess_models._patcher("Flux", dict(tiny.FLUX_TINY_NET, image_model="flux", **TRANSFORMER_WIDTH),
                                         seed, dtype)
    return inprocess_models._patcher("HunyuanVideo", dict(tiny.HUNYUAN_VIDEO_TINY_NET, **TRANSFORMER_WIDTH), seed, dtype)


def inputs(family: str, n: int, seed: int = 0):
    """n latents [n, ...], text contexts [n, L, D] and pooled outputs [n, P] (or None)."""
    import torch
    shape, (length, width), pooled = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, *shape, generator=g)
    context = torch.randn(n, length, width, generator=g)
    return latents, context, None if pooled is None else torch.randn(n, pooled, generator=g)


def conditioning(pack, family, context, pooled):
    extra = {"guidance": 1.0} if family.startswith(("flux", "hunyuan")) else {}
    return pack("training.protocol").Conditioning(context, pooled, extra)


@contextlib.contextmanager
def floor_region(pack, patcher, checkpointing: bool):
    """What a frozen forward + backward needs and nothing more: ComfyUI's training flag (0.33) or the
    RoPE substitute (0.8); residual adds made out of place (`Tensor.__iadd__` patched, in this
    benchmark process only) for the Flux-style models whose in-place adds would break backward; and
    with `checkpointing` torch's own non-reentrant checkpoint around the same units Dojo checkpoints."""
    import torch
    import torch.utils.checkpoint
    cc, protection, safety = pack("nodes.comfy_compat"), pack("nodes.grad_protection"), pack("training.grad_safety")
    subs = cc.training_substitutions()
    units = protection.checkpoint_units(patcher)
    patched = protection.needs_protection(patcher)
    with contextlib.ExitStack() as stack:
        stack.enter_context(cc.comfy_training_mode())
        if subs:
            stack.enter_context(safety.op_substitutions(subs))
        if patched:
            torch.Tensor.__iadd__ = lambda self, other: self + other
            stack.callback(lambda: delattr(torch.Tensor, "__iadd__"))
        if checkpointing:
            for unit in units:
                fwd = type(unit).forward.__get__(unit)
                unit.forward = lambda *a, _f=fwd, **k: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False, **k)
                stack.callback(vars(unit).pop, "forward", None)
        yield


def floor_steps(pack, patcher, family: str, latents, context, pooled, batch: int, steps: int, checkpointing: bool,
                bf16: bool = True, on_step=None):
    """`steps` frozen forward + backward passes (gradient with respect to the input latents only)
    through ComfyUI's own apply_model, as Dojo's view calls it."""
    import torch
    cm, cc = pack("nodes.comfy_model"), pack("nodes.comfy_compat")
    with torch.inference_mode(False), torch.enable_grad():
        clone = cc.training_clone(patcher)
        cc.load_for_compute(clone)
        cc.materialize_inference_tensors(clone.model)
        view = cm.ComfyDenoisingModel(clone)
        cond = conditioning(pack, family, context[:batch].clone(), None if pooled is None else pooled[:batch].clone())
        g = torch.Generator().manual_seed(1)
        with floor_region(pack, clone, checkpointing):
            for _ in range(steps):
                x = latents[:batch].clone().requires_grad_(True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = view.predict(x, torch.rand(batch, generator=g), cond)
                out.float().pow(2).mean().backward()
                if on_step is not None:
                    on_step()
