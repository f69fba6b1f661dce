"""Tiny random-weight model files that ComfyUI's own loaders detect as the real families, and in-process
builders for the families whose smallest detectable file is too big for routine tests (DESIGN.md
section 6). Everything is built with the booted ComfyUI's own classes, so import this only after the
`comfy` fixture has booted ComfyUI.

Files are written once into a cache, ~/.cache/comfyui-dojo-tests/<ComfyUI version>/<builder>-<key>/
($DOJO_TEST_CACHE overrides the root), from fixed seeds, and linked into a ComfyUI base directory. The
builder key is derived from the code that builds the files (builder_key), so any change to a builder,
a config or a seed writes fresh files instead of reusing stale ones; the folders of the builder's other
keys are then removed once unused for a while (prune_old_keys).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import tiny_comfy_models
from tiny_comfy_models import randomize_, write_tiny_hunyuan_video

# Where each file goes under <base>/models and the name tests see.
SD_TAESD_VAE = ("vae", "tiny_taesd_sd.safetensors")
FLUX_TAESD_VAE = ("vae", "tiny_taesd_16ch.safetensors")
TAEHV_VAE = ("vae", "tiny_taehv_hunyuan_video.safetensors")
CLIP_L = ("text_encoders", "tiny_random_clip_l.safetensors")
SD15_CHECKPOINT = ("checkpoints", "tiny_sd15.safetensors")
HUNYUAN_VIDEO_UNET = ("diffusion_models", "tiny_hunyuan_video.safetensors")
FLUX_UNET = ("diffusion_models", "tiny_flux_detectable.safetensors")


# --------------------------------------------------------------------------------------- cache

def comfyui_version() -> str:
    import comfyui_version as v
    return v.__version__


def _code_of(path: Path) -> str:
    """A module's code as its syntax tree, docstrings left out: editing comments or docstrings keeps the
    cached files; any change to code, configs or seeds does not."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


BUILDER_MODULES = (Path(__file__), Path(tiny_comfy_models.__file__))


def builder_key(modules=BUILDER_MODULES) -> str:
    """The cache key of the files the builders write: a hash of the builders' code (this module and
    tiny_comfy_models), the model-seed offset (tiny_comfy_models.seed_offset) and the torch version
    (whose random generator fills the weights)."""
    h = hashlib.sha256()
    for module in modules:
        h.update(_code_of(Path(module)).encode())
    h.update(f"seed offset {tiny_comfy_models.seed_offset()}; torch {torch.__version__}".encode())
    return "b" + h.hexdigest()[:16]


def builder_name(modules=BUILDER_MODULES) -> str:
    return "+".join(Path(m).stem for m in modules)


def cache_dir(modules=BUILDER_MODULES) -> Path:
    root = Path(os.environ.get("DOJO_TEST_CACHE") or Path.home() / ".cache" / "comfyui-dojo-tests").expanduser()
    return root / comfyui_version() / f"{builder_name(modules)}-{builder_key(modules)}"


# A key folder is touched each time a file is taken from it; one untouched this long is no longer being
# written or linked from (a run on another checkout, whose builders differ, keeps its folder while it works).
PRUNE_AFTER_S = 15 * 60
_PRUNED: set[Path] = set()


def _remove_unused(keep: Path, own: re.Pattern, is_kind: Callable[[Path], bool], older_than_s: float) -> list[Path]:
    """Remove the entries beside `keep` whose names `own` matches, of the kind `is_kind` accepts (never a
    symlink), untouched for `older_than_s`."""
    removed = []
    for entry in keep.parent.iterdir():
        if entry == keep or not own.fullmatch(entry.name) or entry.is_symlink() or not is_kind(entry):
            continue
        try:
            if time.time() - entry.stat().st_mtime < older_than_s:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
        except FileNotFoundError:  # another test process removed it first
            continue
        removed.append(entry)
    return removed


def prune_old_keys(current: Path, older_than_s: float = PRUNE_AFTER_S) -> list[Path]:
    """Remove the folders of `current`'s builder with other keys (and folders of the older layout, named by
    the key alone) unused for `older_than_s`: only names this module makes, nothing else in the cache."""
    own = re.compile(re.escape(current.name.rsplit("-", 1)[0]) + r"-b[0-9a-f]{16}|b[0-9a-f]{16}")
    return _remove_unused(current, own, Path.is_dir, older_than_s)


def prune_old_file_keys(target: Path, older_than_s: float = PRUNE_AFTER_S) -> list[Path]:
    """For a file named with its own builder key (`<stem>_b<key>.safetensors`, tiny_qwen), remove the same
    file's other keys in its folder once unused for `older_than_s`; nothing else."""
    match = re.fullmatch(r"(.+)_b[0-9a-f]{16}(\.safetensors)", target.name)
    if match is None:
        return []
    own = re.compile(re.escape(match[1]) + r"_b[0-9a-f]{16}" + re.escape(match[2]))
    return _remove_unused(target, own, Path.is_file, older_than_s)


def cached_file(name: str, write: Callable[[Path], object], modules=BUILDER_MODULES) -> Path:
    """The cached file `name`, written by `write(path)` first when it is missing. The writer writes a
    temporary name that is renamed into place, so an interrupted or concurrent run never leaves a
    half-written file under the final name. `modules`: the builder modules whose code keys the cache
    (other stand-in modules add themselves to tiny_files' own)."""
    target = cache_dir(modules) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.utime(target.parent)  # in use (prune_old_keys)
    if target.parent not in _PRUNED:
        _PRUNED.add(target.parent)
        prune_old_keys(target.parent)
    if target.is_file():
        with contextlib.suppress(OSError):  # in use (prune_old_file_keys); a read-only cache still serves
            os.utime(target)
        return target
    prune_old_file_keys(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp.safetensors", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def link_into(base: Path, folder: str, name: str, source: Path) -> str:
    """Hard-link (else symlink) `source` into <base>/models/<folder>/<name>; returns the name."""
    dest = base / "models" / folder / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    try:
        os.link(source, dest)
    except OSError:
        dest.symlink_to(source)
    return name


def provide(base: Path, where: tuple[str, str], write: Callable[[Path], object], modules=BUILDER_MODULES) -> str:
    folder, name = where
    return link_into(base, folder, name, cached_file(name, write, modules))


# ------------------------------------------------------------------------------------- helpers

def _save(state: dict, path: Path, dtype: torch.dtype | None = None) -> Path:
    import safetensors.torch
    out = {}
    for k, v in state.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(out, str(path))
    return path


def _random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    module.to_empty(device="cpu")
    randomize_(module, seed)
    return module


# ---------------------------------------------------------------------------------------- VAEs

def taesd_state_dict(latent_channels: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> dict:
    """ComfyUI's TAESD with random weights: keys taesd_encoder.*, taesd_decoder.*, vae_scale, vae_shift
    (what comfy.sd.VAE detects by 'taesd_decoder.1.weight'; its input width is the latent channels)."""
    import comfy.taesd.taesd as taesd
    model = _random(taesd.TAESD(latent_channels=latent_channels), seed)
    with torch.no_grad():
        model.vae_scale.fill_(scale)
        model.vae_shift.fill_(shift)
    return model.state_dict()


def write_taesd_vae(path: Path, latent_channels: int = 4, seed: int = 1) -> Path:
    """A TAESD-architecture image VAE (~2.4 M params) for VAELoader: 4 channels for SD1.5/SDXL,
    16 for Flux-style latents."""
    scale, shift = (0.18215, 0.0) if latent_channels == 4 else (0.3611, 0.1159)
    return _save(taesd_state_dict(latent_channels, seed, scale, shift), path)


def write_taehv_vae(path: Path, seed: int = 3) -> Path:
    """A TAEHV-architecture video VAE (16 latent channels). Saved fp16: ComfyUI takes an fp16 TAEHV as
    HunyuanVideo's (latent format HunyuanVideo) and an fp32 one as lighttaew2_1 (Wan 2.1)."""
    import comfy.taesd.taehv as taehv
    model = _random(taehv.TAEHV(latent_channels=16), seed)
    return _save(model.state_dict(), path, torch.float16)


# ---------------------------------------------------------------------------------------- CLIP

def clip_l_state_dict(seed: int = 4) -> dict:
    """A random full-size CLIP-L text model in ComfyUI's layout (keys text_model.*, text_projection.*)."""
    import comfy.sd1_clip
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    return _random(clip.transformer, seed).state_dict()


def write_clip_l(path: Path, seed: int = 4) -> Path:
    """For CLIPLoader type stable_diffusion: 123 M params, fp16 on disk (~246 MB)."""
    return _save(clip_l_state_dict(seed), path, torch.float16)


# ------------------------------------------------------------------------------------ SD1.5

# What SD1.5 detection pins (comfy.supported_models.SD15): model_channels 320, context_dim 768, no linear
# projection in the transformers, no adm. Everything else may be small: 2 levels at 320 channels,
# 1 res block each, one transformer block where there is attention.
SD15_TINY_UNET = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1], channel_mult=[1, 1],
    transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1,
    use_temporal_resblock=False, use_temporal_attention=False,
)


def _unet(config: dict, seed: int) -> torch.nn.Module:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return _random(UNetModel(**config, device="cpu", operations=comfy.ops.disable_weight_init), seed)


def write_sd15_checkpoint(path: Path, seed: int = 5) -> Path:
    """An SD1.5 checkpoint for CheckpointLoaderSimple: the tiny SD15 UNet above, a random CLIP-L and a
    TAESD-architecture VAE (comfy.sd.VAE detects it under first_stage_model.). fp16 on disk."""
    state = {}
    for k, v in _unet(SD15_TINY_UNET, seed).state_dict().items():
        state["model.diffusion_model." + k] = v
    for k, v in clip_l_state_dict(seed + 1).items():
        state["cond_stage_model.transformer." + k] = v
    for k, v in taesd_state_dict(4, seed + 2, 0.18215, 0.0).items():
        state["first_stage_model." + k] = v
    return _save(state, path, torch.float16)


# ------------------------------------------------------------------------------------- SDXL

# SDXL detection pins model_channels 320, context 2048, adm 2816, linear projections and
# transformer_depth [0, 0, 2, 2, 10, 10] (3 levels x 2 res blocks, 24 transformer blocks at least), and
# the checkpoint carries CLIP-L (123 M) and the fixed-size CLIP-G (695 M). The smallest detectable
# checkpoint (write_sdxl_checkpoint) is ~0.95 G params, 1.9 GB in fp16, ~26 s to write here, ~2 s to
# load. Tests that only need an SDXL model use build_tiny_sdxl, a tiny UNet of SDXL's shape in process.
SDXL_TINY_UNET = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, num_classes="sequential",
    adm_in_channels=2816, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1],
    channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
    transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=2048,
    use_temporal_resblock=False, use_temporal_attention=False,
)


# The smallest UNet SDXL detection accepts: 320 channels at every level, the pinned input-side transformer
# depths, nothing else with attention.
SDXL_SMALLEST_DETECTABLE_UNET = dict(
    SDXL_TINY_UNET, model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1],
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0] * 9, transformer_depth_middle=-1,
    num_heads=-1, num_head_channels=64,
)


def write_sdxl_checkpoint(path: Path, seed: int = 6) -> Path:
    """The smallest SDXL checkpoint CheckpointLoaderSimple detects as SDXL: the UNet above (~0.1 G params),
    random full-size CLIP-L and CLIP-G laid out by ComfyUI's own SDXL saving conversion, and a TAESD VAE.
    fp16, 1.9 GB."""
    import comfy.sdxl_clip
    import comfy.supported_models
    state = {}
    for k, v in _unet(SDXL_SMALLEST_DETECTABLE_UNET, seed).state_dict().items():
        state["model.diffusion_model." + k] = v.half()
    clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32)
    _random(clip, seed + 1)
    clip_sd = {k: v.half() for k, v in clip.state_dict().items()}
    del clip
    config = comfy.supported_models.SDXL(dict(SDXL_SMALLEST_DETECTABLE_UNET))
    state.update(config.process_clip_state_dict_for_saving(clip_sd))
    for k, v in taesd_state_dict(4, seed + 2, 0.13025, 0.0).items():
        state["first_stage_model." + k] = v
    return _save(state, path, torch.float16)


def build_tiny_sdxl(seed: int = 7):
    """A ComfyUI SDXL BaseModel (comfy.model_base.SDXL, config comfy.supported_models.SDXL) with a tiny
    random UNet, wrapped in a ModelPatcher. Context 2048 and adm 2816 as the real one; ~2.6 M params."""
    import comfy.supported_models
    from inprocess_models import patcher_for
    return patcher_for(comfy.supported_models.SDXL(dict(SDXL_TINY_UNET)), seed)


# ------------------------------------------------------------------------------------- Flux

FLUX_TINY = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=768, hidden_size=64,
    mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 14, 14], theta=10000,
    patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[],
)


def _flux_config(overrides: dict) -> dict:
    import comfy.ldm.flux.model as flux
    known = {f.name for f in dataclasses.fields(flux.FluxParams)} | {"image_model"}
    return {k: v for k, v in {**FLUX_TINY, **overrides}.items() if k in known}


def build_tiny_flux(seed: int = 8, **overrides):
    """ComfyUI's Flux (comfy.model_base.Flux, config comfy.supported_models.Flux) with a small config
    (hidden 64, 2 heads, 1 double + 1 single block, context and pooled width 768 to match CLIP-L), wrapped
    in a ModelPatcher: ~0.4 M params. For routine tests; it does not go through a loader."""
    import comfy.supported_models
    from inprocess_models import patcher_for
    return patcher_for(comfy.supported_models.Flux(_flux_config(overrides)), seed)


def _flux_state_dict_shapes(hidden_size: int) -> dict:
    import comfy.ldm.flux.model as flux
    import comfy.ops
    config = _flux_config(dict(hidden_size=hidden_size, num_heads=hidden_size // 128, axes_dim=[16, 56, 56]))
    config.pop("image_model")
    model = flux.Flux(**config, device="meta", operations=comfy.ops.disable_weight_init)
    return model.state_dict()


def smallest_detectable_flux_hidden() -> int:
    """The smallest hidden size (a multiple of 128, ComfyUI's Flux head width) that this ComfyUI's
    detection reads back as the same Flux: 0.8.0 pins 24 heads (hidden 3072); newer versions derive the
    heads from the hidden size."""
    import comfy.model_detection
    for hidden in (256, 3072):
        config = comfy.model_detection.detect_unet_config(_flux_state_dict_shapes(hidden), "")
        if config and config.get("hidden_size") == hidden and config.get("num_heads") * 128 == hidden:
            return hidden
    raise RuntimeError("no Flux hidden size this ComfyUI detects consistently")


def write_detectable_flux(path: Path, hidden_size: int | None = None, seed: int = 9) -> Path:
    """A Flux transformer file that UNETLoader detects as Flux: 1 double + 1 single block, head width 128,
    context/pooled 768. hidden_size None takes the smallest this ComfyUI detects (256 on 0.33: ~4 M
    params; 3072 on 0.8.0: ~535 M params, ~1.1 GB in bf16, ~10 s per training step). Saved bf16."""
    import comfy.ldm.flux.model as flux
    import comfy.ops
    hidden = hidden_size or smallest_detectable_flux_hidden()
    config = _flux_config(dict(hidden_size=hidden, num_heads=hidden // 128, axes_dim=[16, 56, 56]))
    config.pop("image_model")
    model = _random(flux.Flux(**config, operations=comfy.ops.disable_weight_init), seed)
    return _save(model.state_dict(), path, torch.bfloat16)


# ------------------------------------------------------------------------------- into a base

def provide_sd_taesd(base: Path) -> str:
    return provide(base, SD_TAESD_VAE, lambda p: write_taesd_vae(p, 4))


def provide_flux_taesd(base: Path) -> str:
    return provide(base, FLUX_TAESD_VAE, lambda p: write_taesd_vae(p, 16, seed=2))


def provide_taehv(base: Path) -> str:
    return provide(base, TAEHV_VAE, write_taehv_vae)


def provide_clip_l(base: Path) -> str:
    return provide(base, CLIP_L, write_clip_l)


def provide_sd15_checkpoint(base: Path) -> str:
    return provide(base, SD15_CHECKPOINT, write_sd15_checkpoint)


def provide_hunyuan_video(base: Path) -> str:
    return provide(base, HUNYUAN_VIDEO_UNET, write_tiny_hunyuan_video)


def provide_sdxl_checkpoint(base: Path) -> str:
    return provide(base, ("checkpoints", "smallest_sdxl.safetensors"), write_sdxl_checkpoint)


def provide_detectable_flux(base: Path) -> str:
    hidden = smallest_detectable_flux_hidden()
    folder, name = FLUX_UNET
    name = name.replace(".safetensors", f"_h{hidden}.safetensors")
    return provide(base, (folder, name), lambda p: write_detectable_flux(p, hidden))
