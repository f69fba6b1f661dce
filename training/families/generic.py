"""Generic mode (issue 18): a FamilySpec built at run time for a model ComfyUI loads but no family module
describes (SD3.5, LTX-Video, Lumina 2, AuraFlow, ...).

What a first-class module states, this one reads from the network itself:
- blocks: the nn.ModuleLists of repeated blocks (one class) that hold nn.Linear layers, outermost only;
  lists of nn.Sequential containers are skipped because ComfyUI's UNets call their layers one by one and
  never the container, so a checkpoint wrapper on it would never run (the transformer blocks inside are
  found instead);
- targets: the linears inside those blocks, sorted into attention and MLP by the names and classes of
  the modules around them (`attn`, `attention`; `mlp`, `ff`, `feed_forward`, `ffn`); a preset that finds
  none of its kind takes every block linear, so that no preset is empty;
- in-place writes: unknown, so the blocks are always protected (copy-on-write of saved tensors, which
  raises rather than giving a wrong gradient when a write escapes it); this costs a little speed;
- the objective comes from ComfyUI's `model_sampling` as for every family; the file uses ComfyUI's
  generic layout (`diffusion_model.<module>.lora_up/down.weight`), which its LoRA loaders map for any model.

Pure logic, no ComfyUI import: the pack's ComfyUI side passes the network and what ComfyUI says about it.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from torch import nn

from ..protocol import Family, TargetPreset
from ..recipes import CHECKPOINTING_PARAMETER_THRESHOLD, LoraRecipe
from . import COMFY_GENERIC, FamilySpec, FileMetadata

COMFYUI_URL = "https://github.com/comfyanonymous/ComfyUI"
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_MLP = re.compile(r"mlp|feed_?forward|ffn|(^|_)ff($|_)", re.IGNORECASE)


class GenericModelError(ValueError):
    """A model generic mode cannot train, with a message naming its ComfyUI class and why."""


@dataclass(frozen=True)
class ComfyModelFacts:
    """What ComfyUI says about a loaded model, gathered by the pack's compatibility module."""
    config_name: str           # comfy.supported_models class (the "config" ComfyUI detected)
    model_class: str           # comfy.model_base class, e.g. SD3
    network_class: str         # the diffusion network's class, e.g. OpenAISignatureMMDITWrapper
    latent_channels: int
    latent_dims: int = 2       # 2: images [C, H, W]; 3: video [C, T, H, W]
    spatial_scale: int = 8     # pixels per latent cell
    temporal_scale: int = 1    # frames per latent frame (after the first) for video

    @property
    def described(self) -> str:
        return f"ComfyUI model '{self.config_name}' (class {self.model_class}, network {self.network_class})"


def _is_block_list(module: nn.Module) -> bool:
    blocks = list(module)
    if not blocks or isinstance(blocks[0], (nn.Linear, nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    if any(type(b) is not type(blocks[0]) for b in blocks):
        return False
    return any(isinstance(m, nn.Linear) for m in blocks[0].modules())


def find_block_lists(net: nn.Module) -> tuple[str, ...]:
    """Dotted names (in registration order, which is call order in ComfyUI's models) of the outermost
    nn.ModuleLists of repeated blocks holding linear layers."""
    found: list[str] = []
    for name, module in net.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(f + ".") for f in found):
            continue
        if _is_block_list(module):
            found.append(name)
    return tuple(found)


def blocks_of(net: nn.Module, block_lists: tuple[str, ...]) -> list[nn.Module]:
    """The blocks of the named lists, in order (a list name may be a dotted path)."""
    return [block for name in block_lists for block in net.get_submodule(name)]


def _kind(block: nn.Module, path: str) -> str:
    """'attention', 'mlp' or 'other' for the linear at `path` inside `block`, from the attribute names and
    classes of the modules on the way to it (the linear's own name included)."""
    parts = path.split(".")
    module, words = block, []
    for part in parts:
        module = module.get_submodule(part)
        words += [part, type(module).__name__]
    if any(_ATTENTION.search(w) for w in words):
        return "attention"
    if any(_MLP.search(w) for w in words):
        return "mlp"
    return "other"


def block_linears(net: nn.Module, block_lists: tuple[str, ...]) -> dict[str, str]:
    """Qualified name -> kind ('attention' / 'mlp' / 'other') of every linear inside the blocks."""
    out = {}
    for list_name in block_lists:
        for i, block in enumerate(net.get_submodule(list_name)):
            for sub, module in block.named_modules():
                if isinstance(module, nn.Linear) and sub:
                    out[f"{list_name}.{i}.{sub}"] = _kind(block, sub)
    return out


def _exact(names) -> str:
    """A regular expression matching exactly these module names (spec targets are regexes)."""
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def target_patterns(kinds: dict[str, str]) -> dict[TargetPreset, str]:
    everything = list(kinds)
    attention = [n for n, k in kinds.items() if k == "attention"] or everything
    attention_mlp = [n for n, k in kinds.items() if k in ("attention", "mlp")] or everything
    return {TargetPreset.ATTENTION: _exact(attention), TargetPreset.ATTENTION_MLP: _exact(attention_mlp),
            TargetPreset.ALL_LINEAR: _exact(everything)}


def build_spec(net: nn.Module, facts: ComfyModelFacts) -> FamilySpec:
    """The generic spec for `net`, or GenericModelError naming the model when it has nothing to train."""
    block_lists = find_block_lists(net)
    kinds = block_linears(net, block_lists)
    if not kinds:
        raise GenericModelError(
            f"Dojo cannot train {facts.described}: it has no family module, and generic mode found no linear "
            "layers inside repeated transformer blocks (nn.ModuleList of blocks) to put a LoRA on. Train a "
            "family Dojo supports, or ask for this model to get a family module.")
    parameters = sum(p.numel() for p in net.parameters())
    recipe = LoraRecipe(16, 1e-4, TargetPreset.ATTENTION_MLP, parameters >= CHECKPOINTING_PARAMETER_THRESHOLD)
    video = facts.latent_dims == 3
    return FamilySpec(
        family=Family.GENERIC,
        label=f"{facts.config_name} (generic mode)",
        comfy_configs=(facts.config_name,),
        recipe=recipe,
        targets=target_patterns(kinds),
        lora_layout=COMFY_GENERIC,
        metadata=FileMetadata(base_model_version=facts.config_name.lower(),
                              architecture=f"comfyui-{facts.config_name.lower()}", implementation=COMFYUI_URL),
        block_lists=block_lists,
        writes_in_place=True,   # unknown code: protect (detects what it cannot fix, never silently wrong)
        video=video,
        frames_rule=f"{facts.temporal_scale}k+1" if video and facts.temporal_scale > 1 else "any",
        vae_time_scale=facts.temporal_scale if video else 1,
        vae_scale=facts.spatial_scale,
        sample_cfg=4.0,         # most models without a module sample with classifier-free guidance
        generic=True,
    )


def describe(spec: FamilySpec, facts: ComfyModelFacts, net: nn.Module) -> str:
    """The log line that says a run is in generic mode, and what it found."""
    lists = ", ".join(f"{name} ({len(net.get_submodule(name))})" for name in spec.block_lists)
    return (f"Dojo: {facts.described} has no Dojo family module, so Dojo trains and applies its LoRAs in "
            f"generic mode: LoRA on the linear layers of its blocks {lists}, every block protected against "
            "in-place writes, files in ComfyUI's generic diffusion_model.<layer> layout")


# Messages of autograd failures that mean the model's forward is not differentiable as ComfyUI runs it
# (a wrapper under no_grad, an op without a backward formula, a detached output).
_BACKWARD_FAILURES = ("does not require grad", "no autograd formula", "does not have a grad_fn",
                      "derivative for", "not implemented for", "inference tensors cannot be saved")


@contextlib.contextmanager
def backward_failures_named(facts: ComfyModelFacts):
    """Turn an autograd failure inside a generic run into a GenericModelError naming the model."""
    try:
        yield
    except RuntimeError as e:
        if not any(text in str(e) for text in _BACKWARD_FAILURES):
            raise
        raise GenericModelError(
            f"Dojo cannot train {facts.described} in generic mode: ComfyUI cannot run backward through it "
            f"({e}). A node that wraps the model (its model function or patches) may run it without "
            "gradients; train the model as its loader gives it, or ask for a family module.") from e
