"""Z-Image (Turbo) (ComfyUI's ZImage config: a Lumina 2 NextDiT, comfy/ldm/lumina): a single-stream flow
transformer of `layers` after one stack of `context_refiner` blocks over the Qwen3 text and one of
`noise_refiner` blocks over the image; 16-channel Flux-VAE latents [C, H, W].

The blocks add their residuals out of place (`x = x + gate * ...`; only the Omni / edit path's
`timestep_zero_index` slices scale in place, and text-to-image training never takes it), so they need no
copy-on-write protection; the float64 gradient test checks that.

LoRA files: ComfyUI fuses q, k and v into one `attention.qkv` linear and calls the output `attention.out`;
the layout ComfyUI's Lumina 2 LoRA map and diffusers' Z-Image loader share (and ai-toolkit writes) uses the
original / diffusers names, `diffusion_model.layers.0.attention.to_q.lora_A.weight`, with separate
to_q / to_k / to_v. A LoRA on the fused qkv is written exactly as three LoRAs with its down matrix each
and its up matrix's thirds (q, k and v are equally wide in Z-Image: 30 heads, 30 key/value heads).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..protocol import Family, TargetPreset
from ..recipes import LoraRecipe
from . import Factors, FamilySpec, FileMetadata, LoraLayout, register, renamer

Z_IMAGE_BLOCKS = ("context_refiner", "noise_refiner", "layers")   # in call order

_BLOCK = r"(layers|noise_refiner|context_refiner)\.\d+\."
Z_IMAGE_TARGETS = {
    TargetPreset.ATTENTION: _BLOCK + r"attention\.(qkv|out)$",
    TargetPreset.ATTENTION_MLP: _BLOCK + r"(attention\.(qkv|out)|feed_forward\.w[123])$",
    TargetPreset.ALL_LINEAR: _BLOCK,   # adds the noise refiner's and layers' adaLN modulation
}

# ComfyUI's NextDiT names -> the original / diffusers ones (comfy.utils.z_image_to_diffusers, inverted).
DIFFUSERS_NAMES = renamer([(r"attention\.out$", "attention.to_out.0")])



@dataclass(frozen=True)
class SplitFusedLayout(LoraLayout):
    """A layout whose convention keeps apart the parts of a linear ComfyUI fuses: `fused` maps the fused
    module's name suffix to its parts' suffixes (equally wide, in the order of the fused output rows).
    A fused module's LoRA (down, up) is written as one LoRA per part, (down, that part's rows of up): their
    deltas stacked are exactly the fused delta, in ComfyUI (which applies each part to its rows) and in a
    model with separate linears."""
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def parts(self, name: str) -> list[str] | None:
        for suffix, parts in self.fused:
            if name == suffix or name.endswith("." + suffix):
                stem = name[:len(name) - len(suffix)]
                return [stem + part for part in parts]
        return None

    def state_dict(self, factors: Factors, diffusers_names: Mapping[str, str] | None = None
                   ) -> dict[str, torch.Tensor]:
        split: Factors = {}
        for name, (down, up) in factors.items():
            parts = self.parts(name)
            if parts is None:
                split[name] = (down, up)
                continue
            if up.shape[0] % len(parts):
                raise ValueError(f"cannot split the LoRA of '{name}' ({up.shape[0]} outputs) into {len(parts)} "
                                 "equal parts")
            # Own tensors per part: safetensors refuses tensors that share memory.
            split.update({part: (down.clone(), rows.clone()) for part, rows in zip(parts, up.chunk(len(parts)))})
        return super().state_dict(split, diffusers_names)

    def join_fused(self, state: dict[str, torch.Tensor], module_names,
                   diffusers_names: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
        """The inverse for reading a file back: each fused module's part LoRAs -> one (down, up) under the
        fused module's own keys. Parts must share their down matrix (as Dojo writes them); a file that
        trained them separately cannot continue as one rank-r LoRA and is refused in words."""
        state = dict(state)
        for name in module_names:
            parts = self.parts(name)
            if parts is None:
                continue
            keys = [self.keys(part, diffusers_names) for part in parts]
            present = [k[0] in state or k[1] in state for k in keys]
            if not any(present):
                continue
            if not all(k[0] in state and k[1] in state for k in keys):
                raise ValueError(f"the LoRA holds only some of {', '.join(p.rsplit('.', 1)[-1] for p in parts)} "
                                 f"for '{name}'")
            downs = [state.pop(k[0]) for k in keys]
            ups = [state.pop(k[1]) for k in keys]
            alphas = [state.pop(k[2], None) for k in keys]
            ups = [u if a is None else u * (a.item() / d.shape[0]) for u, d, a in zip(ups, downs, alphas)]
            if not all(d.shape == downs[0].shape and torch.equal(d, downs[0]) for d in downs[1:]):
                raise ValueError(f"the LoRA trained {', '.join(p.rsplit('.', 1)[-1] for p in parts)} of '{name}' "
                                 "separately (different down matrices); Dojo trains them as one fused layer and "
                                 "can continue only from files whose parts share one (as Dojo writes them)")
            down_key, up_key, _ = self.keys(name, diffusers_names)
            state[down_key], state[up_key] = downs[0], torch.cat(ups)
        return state


LAYOUT = SplitFusedLayout(prefix="diffusion_model.", down=".lora_A.weight", up=".lora_B.weight", alpha=False,
                          underscores=False, rename=DIFFUSERS_NAMES,
                          fused=(("attention.qkv", ("attention.to_q", "attention.to_k", "attention.to_v")),))

SPEC = register(FamilySpec(
    family=Family.Z_IMAGE,
    label="Z-Image",
    comfy_configs=("ZImage",),
    # ai-toolkit's Z-Image (Turbo) LoRA recipe: rank 16, lr 1e-4, attention and MLP of every block; a 6 B
    # model, so checkpointing by default.
    recipe=LoraRecipe(16, 1e-4, TargetPreset.ATTENTION_MLP, True),
    targets=Z_IMAGE_TARGETS,
    lora_layout=LAYOUT,
    metadata=FileMetadata(base_model_version="z_image", architecture="z-image-turbo",
                          implementation="https://github.com/Tongyi-MAI/Z-Image",
                          network_module="networks.lora_zimage",
                          hub_base_model="Tongyi-MAI/Z-Image-Turbo", diffusers_pipeline="ZImagePipeline"),
    block_lists=Z_IMAGE_BLOCKS,
    writes_in_place=False,
    # Z-Image Turbo is step- and guidance-distilled: previews sample without CFG.
    sample_cfg=1.0,
))
