"""Tiny stand-ins for Qwen-Image and Z-Image (issue 18), built with the booted ComfyUI's own classes.

Diffusion models:
- in process (`tiny_qwen_image_patcher`, `tiny_z_image_patcher`): ComfyUI's own model configs
  (comfy.supported_models.QwenImage / ZImage) and networks with small widths, wrapped in a ModelPatcher
  as the loaders return them. For the training and gradient checks.
- files UNETLoader detects (`provide_qwen_image_unet`, `provide_z_image_unet`): the smallest networks
  ComfyUI's detection reads back as the same family. Qwen-Image detection reads only the block count and
  input width, so the rest keeps the real widths (24 heads of 128, text width 3584): 1 block, 380 M
  parameters, 0.76 GB in bf16. Z-Image is detected by its width 3840 (30 heads of 128); 1 main layer plus
  the two noise and two context refiner layers every NextDiT has: 0.9 G parameters, 1.8 GB in bf16.

Text encoders: ComfyUI builds Qwen2.5-VL-7B and Qwen3-4B from fixed configs whatever the file holds
(CLIPLoader would allocate 7-8 G parameters), so no small file can stand in behind CLIPLoader. The tiny
encoders here are ComfyUI's own encoder classes (comfy.text_encoders.qwen_image / z_image: their chat
templates, ComfyUI's bundled Qwen tokenizer, hidden-state layer, template stripping and attention masks)
with a small language model config passed the way ComfyUI passes per-model configs
(model_options["<name>_model_config"]), wrapped in comfy.sd.CLIP. The Qwen2.5-VL vision tower (fixed
1280 wide, 0.67 G parameters) is left out: text-to-image prompts never reach it.
"""
from __future__ import annotations

from pathlib import Path

import torch

import tiny_files
from tiny_comfy_models import randomize_

QWEN_IMAGE_UNET = ("diffusion_models", "tiny_qwen_image_detectable.safetensors")
WAN21_TAEHV = ("vae", "tiny_taehv_wan21.safetensors")
Z_IMAGE_UNET = ("diffusion_models", "tiny_z_image_detectable.safetensors")

# Small language models: the vocabulary the tokenizer needs (special tokens up to 151645), width 64,
# 2 layers of 2 heads; the head width (128) and Qwen2.5-VL's RoPE axes are fixed in ComfyUI's configs.
TINY_TE_WIDTH = 64
_TINY_LLM = dict(vocab_size=151936, hidden_size=TINY_TE_WIDTH, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
TINY_QWEN25_VL = dict(_TINY_LLM)
TINY_QWEN3 = dict(_TINY_LLM, num_hidden_layers=3)  # Z-Image reads the second-to-last hidden state

# Diffusion networks of the real shape, small widths; text width = the tiny encoders' hidden size.
QWEN_IMAGE_TINY = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TINY_TE_WIDTH,
                       axes_dims_rope=(4, 6, 6))
# Z-Image's modulation needs width >= 256 (its timestep embedding is 256 wide); 2 heads of 128 keep the
# real head width and RoPE axes.
Z_IMAGE_TINY = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=TINY_TE_WIDTH,
                    n_layers=2, n_refiner_layers=1, qk_norm=True, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48],
                    axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                    z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)


def tiny_qwen_image_patcher(seed: int = 20):
    """A Qwen-Image BaseModel (comfy.model_base.QwenImage, config QwenImage) with a tiny network: 2 blocks,
    2 heads of 16, text width 64. ~0.2 M parameters."""
    import comfy.supported_models
    from inprocess_models import patcher_for
    return patcher_for(comfy.supported_models.QwenImage(dict(QWEN_IMAGE_TINY, dtype=torch.float32)), seed)


def tiny_z_image_patcher(seed: int = 21):
    """A Z-Image BaseModel (comfy.model_base.Lumina2 with config ZImage) with a tiny NextDiT: width 256,
    2 heads, 2 layers + 1 noise and 1 context refiner, text width 64. ~4.5 M parameters."""
    return _z_image_patcher(Z_IMAGE_TINY, seed)


# The smallest NextDiT whose weights also fit diffusers' ZImageTransformer2DModel: diffusers fixes the
# timestep embedding's hidden width at 1024 (ComfyUI: min(width, 1024)) and makes the MLP 8/3 x width wide
# (ComfyUI rounds that up to a multiple of 256), so the width is >= 1024, a multiple of 128 (the heads) and
# of 96 (the MLP): 1152, 9 heads; 1 layer + 1 + 1 refiners, ~50 M parameters.
Z_IMAGE_DIFFUSERS_SIZED = dict(Z_IMAGE_TINY, dim=1152, n_heads=9, n_kv_heads=9, n_layers=1)


def tiny_z_image_diffusers_sized_patcher(seed: int = 26):
    return _z_image_patcher(Z_IMAGE_DIFFUSERS_SIZED, seed)


def _z_image_patcher(config: dict, seed: int):
    import comfy.supported_models
    from inprocess_models import patcher_for
    return patcher_for(comfy.supported_models.ZImage(dict(config, dtype=torch.float32)), seed)


# ------------------------------------------------------------------------------ detectable files

def _build_random(cls, config: dict, seed: int, dtype=torch.bfloat16) -> torch.nn.Module:
    import comfy.ops
    model = cls(**config, device="meta", dtype=dtype, operations=comfy.ops.disable_weight_init)
    model.to_empty(device="cpu")
    randomize_(model, seed)
    return model


def write_detectable_qwen_image(path: Path, seed: int = 22) -> Path:
    """The smallest Qwen-Image transformer UNETLoader detects: 1 block at the real widths, stored in fp8 (the
    tests load it as fp8 and check detection and key mapping only; fp8 halves the 0.4 G-parameter file)."""
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    model = _build_random(QwenImageTransformer2DModel, dict(num_layers=1), seed)
    return tiny_files._save(model.state_dict(), path, torch.float8_e4m3fn)


Z_IMAGE_DETECTABLE = dict(Z_IMAGE_TINY, dim=3840, n_heads=30, n_kv_heads=30, n_layers=1, n_refiner_layers=2)


def write_detectable_z_image(path: Path, seed: int = 23) -> Path:
    """The smallest Z-Image transformer UNETLoader detects: width 3840, 1 layer (+ 2 + 2 refiners), in fp8
    like the Qwen-Image file."""
    from comfy.ldm.lumina.model import NextDiT
    config = {k: v for k, v in Z_IMAGE_DETECTABLE.items() if k != "image_model"}
    model = _build_random(NextDiT, config, seed)
    return tiny_files._save(model.state_dict(), path, torch.float8_e4m3fn)


def _keyed(where: tuple[str, str]) -> tuple[str, str]:
    """The cached file's name carries this module's own builder key (tiny_files' cache directory already
    carries the key of tiny_files and tiny_comfy_models), so editing these builders writes fresh files
    without invalidating every other family's."""
    folder, name = where
    return folder, name.replace(".safetensors", f"_{tiny_files.builder_key((Path(__file__),))}.safetensors")


def write_wan21_taehv(path: Path, seed: int = 27) -> Path:
    """Qwen-Image's VAE is Wan 2.1's: a TAEHV-architecture VAE saved fp32, which ComfyUI's VAELoader takes
    as Wan 2.1's tiny VAE (lighttaew2_1; fp16 would make it HunyuanVideo's). 16 channels, [C, T, H, W]."""
    import comfy.taesd.taehv as taehv
    model = tiny_files._random(taehv.TAEHV(latent_channels=16), seed)
    return tiny_files._save(model.state_dict(), path, torch.float32)


def provide_wan21_taehv(base: Path) -> str:
    return tiny_files.provide(base, _keyed(WAN21_TAEHV), write_wan21_taehv)


def provide_qwen_image_unet(base: Path) -> str:
    return tiny_files.provide(base, _keyed(QWEN_IMAGE_UNET), write_detectable_qwen_image)


def provide_z_image_unet(base: Path) -> str:
    return tiny_files.provide(base, _keyed(Z_IMAGE_UNET), write_detectable_z_image)


# ------------------------------------------------------------------------------- text encoders

def _tiny_clip(kind: str, seed: int):
    import comfy.sd
    import comfy.supported_models_base
    if kind == "qwen_image":
        import comfy.text_encoders.qwen_image as te_module
        import comfy.text_encoders.llama as llama
        name, config, tokenizer = "qwen25_7b", TINY_QWEN25_VL, te_module.QwenImageTokenizer

        class TextOnlyQwen25VL(llama.Qwen25_7BVLI):
            """ComfyUI's Qwen2.5-VL language model without its vision tower (see the module docstring)."""
            def __init__(self, config_dict, dtype, device, operations):
                torch.nn.Module.__init__(self)
                cfg = llama.Qwen25_7BVLI_Config(**config_dict)
                self.num_layers = cfg.num_hidden_layers
                self.model = llama.Llama2_(cfg, device=device, dtype=dtype, ops=operations)
                self.dtype = dtype

        class Encoder(te_module.Qwen25_7BVLIModel):
            def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True,
                         model_options={}):
                import comfy.sd1_clip
                comfy.sd1_clip.SDClipModel.__init__(
                    self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                    special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=TextOnlyQwen25VL,
                    enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                    model_options=model_options)

        class TE(te_module.QwenImageTEModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):
                import comfy.sd1_clip
                comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, name=name, clip_model=Encoder,
                                                     model_options=model_options)
    elif kind == "z_image":
        import comfy.text_encoders.z_image as te_module
        name, config, tokenizer = "qwen3_4b", TINY_QWEN3, te_module.ZImageTokenizer
        TE = te_module.te()
    else:
        raise ValueError(kind)
    target = comfy.supported_models_base.ClipTarget(tokenizer, TE)
    clip = comfy.sd.CLIP(target, model_options={f"{name}_model_config": dict(config), "dtype": torch.float32})
    with torch.no_grad():
        randomize_(clip.cond_stage_model, seed)
    return clip


def tiny_qwen_image_clip(seed: int = 24):
    """Qwen-Image's text encoder (ComfyUI's QwenImageTEModel / QwenImageTokenizer) with a tiny
    Qwen2.5-VL language model: output width 64."""
    return _tiny_clip("qwen_image", seed)


def tiny_z_image_clip(seed: int = 25):
    """Z-Image's text encoder (ComfyUI's ZImageTEModel / ZImageTokenizer, Qwen3) with a tiny config: width 64."""
    return _tiny_clip("z_image", seed)


# ------------------------------------------------------------------- stand-in loader nodes

class _StandInLoader:
    """A test-only node that returns a stand-in where a workflow's real loader cannot load a tiny file
    (see the module docstring): the workflow tests put it in place of UNETLoader / CLIPLoader."""
    CATEGORY = "testing"
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["qwen_image", "z_image"],)}}


class TinyQwenModelLoader(_StandInLoader):
    RETURN_TYPES = ("MODEL",)

    def load(self, family):
        return (tiny_qwen_image_patcher() if family == "qwen_image" else tiny_z_image_patcher(),)


class TinyQwenCLIPLoader(_StandInLoader):
    RETURN_TYPES = ("CLIP",)

    def load(self, family):
        return (tiny_qwen_image_clip() if family == "qwen_image" else tiny_z_image_clip(),)


def register_stand_in_loaders() -> None:
    import nodes
    nodes.NODE_CLASS_MAPPINGS.setdefault("TinyQwenModelLoader", TinyQwenModelLoader)
    nodes.NODE_CLASS_MAPPINGS.setdefault("TinyQwenCLIPLoader", TinyQwenCLIPLoader)
