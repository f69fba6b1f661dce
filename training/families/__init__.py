"""One place per model family (issue 18).

Everything Dojo must know about a family lives in one module of this package, as one `FamilySpec`:
how ComfyUI names it (detection), which layers an adapter attaches to (targets), the recipe defaults,
the extra conditions its forward needs while training, how its blocks are laid out for gradient
protection / checkpointing / block swap, its latent shape, its LoRA file layout and the metadata other
tools read. The rest of the pack reads these specs and never tests for a family by name, so adding a
family is one module here, its tiny stand-in, its tests and a workflow.

Pure logic, no ComfyUI import: a spec names ComfyUI's classes and modules by their names (strings).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ..protocol import Family, TargetPreset
from ..recipes import LoraRecipe

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


# --- LoRA file layouts ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraLayout:
    """How a LoRA file names the (down, up[, alpha]) tensors of a module.

    `key(name)` maps a module's native name (ComfyUI's `diffusion_model.` path, without that prefix)
    to the file's base key; the tensors are `<base><down>`, `<base><up>` and, when `alpha` is set,
    `<base>.alpha` holding the rank (alpha is folded into up, so every loader applies up @ down).

    kohya style: base = prefix + path with '.' -> '_' (`lora_unet_double_blocks_0_img_attn_qkv`);
    diffusers / musubi style: base = prefix + renamed dotted path, `lora_A` / `lora_B`, no alpha.
    """
    prefix: str = "lora_unet_"
    down: str = ".lora_down.weight"
    up: str = ".lora_up.weight"
    alpha: bool = True
    underscores: bool = True                 # kohya: dots in the module path become underscores
    rename: Callable[[str], str] | None = None   # native name -> the name the file's convention uses
    needs_diffusers_names: bool = False      # SD UNets: the caller supplies ComfyUI's diffusers names

    def base(self, name: str, diffusers_names: Mapping[str, str] | None = None) -> str:
        if self.needs_diffusers_names:
            if diffusers_names is None:
                raise ValueError("SD UNet LoRAs need the diffusers name of each module")
            if name not in diffusers_names:
                raise ValueError(f"no diffusers name known for module '{name}'")
            name = diffusers_names[name]
        if self.rename is not None:
            name = self.rename(name)
        return self.prefix + (name.replace(".", "_") if self.underscores else name)

    def keys(self, name: str, diffusers_names: Mapping[str, str] | None = None) -> tuple[str, str, str]:
        """(down, up, alpha) keys of module `name`; the alpha key is read if present even when not written."""
        base = self.base(name, diffusers_names)
        return base + self.down, base + self.up, base + ".alpha"

    def join_fused(self, state: dict[str, torch.Tensor], module_names,
                   diffusers_names: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
        """A file's tensors with the parts of modules ComfyUI fuses joined back under the fused module's keys
        (the reading side of a layout that splits them, z_image.SplitFusedLayout); here nothing is fused."""
        return state

    def state_dict(self, factors: Factors, diffusers_names: Mapping[str, str] | None = None
                   ) -> dict[str, torch.Tensor]:
        if self.needs_diffusers_names and diffusers_names is not None:
            missing = [n for n in factors if n not in diffusers_names]
            if missing:
                raise ValueError(f"no diffusers name known for {len(missing)} modules, e.g. {missing[:3]}")
        out = {}
        for name, (down, up) in factors.items():
            down_key, up_key, alpha_key = self.keys(name, diffusers_names)
            out[down_key], out[up_key] = down, up
            if self.alpha:
                out[alpha_key] = torch.tensor(float(down.shape[0]))
        return out


KOHYA = LoraLayout()
# ComfyUI's own generic layout, which its LoraLoader reads for any model (diffusion_model.<module>).
COMFY_GENERIC = LoraLayout(prefix="diffusion_model.", underscores=False, alpha=False)


def renamer(rules: list[tuple[str, str]]) -> Callable[[str], str]:
    """A rename function applying regular-expression (pattern, replacement) rules in order."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(name: str) -> str:
        for pattern, repl in compiled:
            name = pattern.sub(repl, name)
        return name
    return rename


# --- file metadata --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileMetadata:
    """What other tools read from a file's metadata (training/file_metadata.py writes the keys)."""
    base_model_version: str        # kohya ss_base_model_version: sd_v1, sdxl_base_v1-0, flux1, wan, ...
    architecture: str              # ModelSpec architecture id (without the /lora suffix)
    implementation: str            # ModelSpec implementation of a LoRA for this family
    network_module: str = "networks.lora"
    default_resolution: tuple[int, int] = (1024, 1024)
    records_prediction: bool = False   # ModelSpec prediction_type (eps / v models: SD1.5, SDXL)
    hub_base_model: str = ""           # the Hugging Face base model a model card names when the file names none
    diffusers_pipeline: str = "DiffusionPipeline"   # the pipeline a model card's diffusers snippet loads


# --- the spec -------------------------------------------------------------------------------------

def no_extra_conditions(noisy: torch.Tensor, extra: dict) -> dict:
    return extra


def training_guidance(noisy: torch.Tensor, extra: dict) -> dict:
    """Guidance-distilled models train at guidance 1 (ai-toolkit, musubi-tuner), not at ComfyUI's sampling
    default (3.5 / 6), unless the encoded conditioning carries its own."""
    return {"guidance": 1.0, **extra}


@dataclass(frozen=True)
class FamilySpec:
    family: Family
    label: str                                  # for messages: "SD1.5", "Wan 2.1"
    comfy_configs: tuple[str, ...]              # comfy.supported_models class names (exact, no subclasses)
    recipe: LoraRecipe
    targets: Mapping[TargetPreset, str]         # regex over the diffusion model's module names
    lora_layout: LoraLayout
    metadata: FileMetadata
    # Transformer block lists (attributes of the diffusion model, in call order) that protection,
    # checkpointing and block swap work on. A UNet (SD1.5 / SDXL) has none; its checkpointing units are
    # the layers inside its `unet_blocks` containers (ComfyUI calls those layers, never the containers),
    # and it cannot block-swap.
    block_lists: tuple[str, ...] = ()
    unet_blocks: tuple[str, ...] = ()
    # Whether blocks write in place into tensors autograd saved: False; "streams" when the only such writes
    # go into a block's own inputs (residual streams like Flux's `img += ...`) and only its submodules
    # read them (cheap protection: grad_safety.clone_stream_reads); True when anywhere (copy-on-write of
    # saved tensors, watching every op). Autograd's version checks catch whatever the choice misses.
    writes_in_place: bool | str = False
    video: bool = False                         # latents [C, T, H, W]
    frames_rule: str = "any"                    # "4k+1" when a video VAE needs 4k+1 frames
    vae_time_scale: int = 1                     # frames per latent frame after the first (video VAEs: 4)
    vae_scale: int = 8                          # pixels per latent cell
    # Conditions the forward needs while training beyond the cached text conditioning, from the batch's
    # noisy latents and the encoded extras (SDXL size ids, training guidance 1.0 for distilled models).
    extra_conditions: Callable[[torch.Tensor, dict], dict] = no_extra_conditions
    sample_cfg: float = 1.0                     # previews / grids: 1.0 for guidance-distilled models
    text_encoders: tuple[str, ...] = ()         # embedding keys textual inversion trains (clip_l, clip_g)
    te_lora_prefixes: Mapping[str, str] = field(default_factory=dict)   # CLIP encoder key -> kohya prefix
    generic: bool = False                       # built at run time by families.generic for an unknown model


# What the helpers over specs accept: a spec (the model view's, possibly built at run time) or a family id.
FamilyLike = Family | str | FamilySpec

_REGISTRY: dict[Family, FamilySpec] = {}
_BY_CONFIG: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add a family to the registry (its module does this on import); refused whole, changing nothing,
    when the family or one of its ComfyUI configs is taken."""
    if spec.family in _REGISTRY:
        raise ValueError(f"family {spec.family.value} registered twice")
    for name in spec.comfy_configs:
        if name in _BY_CONFIG:
            raise ValueError(f"ComfyUI config {name} claimed by {_BY_CONFIG[name].family.value} and "
                             f"{spec.family.value}")
    _REGISTRY[spec.family] = spec
    _BY_CONFIG.update({name: spec for name in spec.comfy_configs})
    return spec


def spec(family: Family | str) -> FamilySpec:
    return _REGISTRY[Family(family)]


def as_spec(family: FamilyLike) -> FamilySpec:
    """The spec itself, or the registered spec of a family id (helpers accept either)."""
    return family if isinstance(family, FamilySpec) else spec(family)


def spec_for_config(config_name: str) -> FamilySpec | None:
    """The first-class family ComfyUI's model config class `config_name` is, or None (generic mode)."""
    return _BY_CONFIG.get(config_name)


def all_specs() -> list[FamilySpec]:
    return list(_REGISTRY.values())


def labels() -> str:
    """The registered families for messages: "SD1.5, SDXL, Flux, HunyuanVideo"."""
    return ", ".join(s.label for s in all_specs())


def _register_all() -> None:
    """Registering happens on import of each family's module: the original four first (the order messages
    list them in), then every other module of this package, so a new family is one new file here."""
    import importlib
    import pkgutil
    for name in ["sd15", "sdxl", "flux", "hunyuan_video"] + sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{name}")


_register_all()
