"""Tiny random-weight Wan stand-ins built with the booted ComfyUI's own classes (issue 18).

- Diffusion models UNETLoader detects: WAN21_T2V (Wan 2.1 T2V 1.3B / 14B, and Wan 2.2 A14B's experts, the
  same network) and WAN22_T2V (Wan 2.2 TI2V 5B: 48 latent channels, `model_base.WAN22`). ComfyUI's Wan
  detection reads dim, ffn width, depth and channels from the weights and fixes heads = dim / 128 and the
  text width (umt5-xxl's 4096), so: dim 256 (2 heads), ffn 512, 2 blocks, ~3 M parameters.
- VAEs VAELoader detects: the Wan 2.1 VAE's own architecture (comfy.ldm.wan.vae.WanVAE: 16 channels,
  8x spatial, 4x temporal, causal so clips are 4k+1 frames) at base width 8 (the loader reads the width
  from the weights; 0.9 M parameters instead of 127 M); for the 48-channel Wan 2.2 latents the lightweight
  TAEHV architecture ComfyUI loads as Wan 2.2's (taew2_2; 16x spatial, 4x temporal). ComfyUI 0.8 loads
  that one for decoding only, and the real Wan 2.2 VAE has a fixed width (705 M parameters): on 0.8 the
  5B tests feed 48-channel latents directly.
- Text: Wan's umt5-xxl loads through CLIPLoader type "wan" with a fixed 5.7 B-parameter config and the
  tokenizer stored in the file, so no tiny file loads there. `tiny_umt5_clip` builds ComfyUI's own CLIP
  around ComfyUI's own T5 encoder class, configured like umt5-xxl's output (4096 wide, attention-masked,
  padding zeroed, at least 512 tokens) but 1 layer deep, with the T5 tokenizer ComfyUI bundles
  (32 k entries; umt5's 256 k-entry tokenizer is not bundled). Built in the test process, not loaded.

Files are cached like tiny_files' (this module is part of their cache key).
"""
from __future__ import annotations

from pathlib import Path

import torch

import tiny_files
from tiny_comfy_models import randomize_
from tiny_files import _random, _save

WAN_TINY = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=256, ffn_dim=512,
                freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=2, window_size=(-1, -1),
                qk_norm=True, cross_attn_norm=True, eps=1e-6)
WAN22_5B_TINY = dict(WAN_TINY, in_dim=48, out_dim=48)

WAN21_UNET = ("diffusion_models", "tiny_wan21_t2v.safetensors")
WAN22_5B_UNET = ("diffusion_models", "tiny_wan22_ti2v_5b.safetensors")
WAN21_VAE = ("vae", "tiny_wan21_vae.safetensors")
WAN22_TAE = ("vae", "tiny_taew2_2.safetensors")

WAN21_VAE_CONFIG = dict(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                        temperal_downsample=[False, True, True], dropout=0.0)

# umt5-xxl's output (4096 wide, gated-GELU T5), 1 layer of 2 narrow heads.
TINY_UMT5_CONFIG = {
    "d_ff": 64, "d_kv": 16, "d_model": 4096, "num_heads": 2, "num_layers": 1, "vocab_size": 32128,
    "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "layer_norm_epsilon": 1e-6, "model_type": "umt5",
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "decoder_start_token_id": 0,
    "eos_token_id": 1, "pad_token_id": 0, "tie_word_embeddings": False, "is_encoder_decoder": True,
}

# These files' cache key covers this module too, so editing a builder here writes fresh files (and the
# other families' files keep theirs).
BUILDER_MODULES = (*tiny_files.BUILDER_MODULES, Path(__file__))


def provide(base: Path, where: tuple[str, str], write) -> str:
    return tiny_files.provide(base, where, write, BUILDER_MODULES)


def _known_wan_args(config: dict) -> dict:
    import inspect
    import comfy.ldm.wan.model as wan
    known = set(inspect.signature(wan.WanModel.__init__).parameters)
    return {k: v for k, v in config.items() if k in known}


def wan_network(config: dict, seed: int, operations=None) -> torch.nn.Module:
    """ComfyUI's WanModel with random weights. `operations`: ComfyUI's op set (default disable_weight_init,
    as its loaders build it; manual_cast computes in the input's dtype, e.g. a float64 reference)."""
    import comfy.ldm.wan.model as wan
    import comfy.ops
    ops = operations or comfy.ops.disable_weight_init
    return _random(wan.WanModel(**_known_wan_args(config), operations=ops), seed)


def write_tiny_wan(path: Path, config: dict = WAN_TINY, seed: int = 21) -> Path:
    """A Wan diffusion model file UNETLoader detects as WAN21_T2V (16 channels) or WAN22_T2V (48)."""
    return _save(wan_network(config, seed).state_dict(), path)


def write_wan21_vae(path: Path, seed: int = 22) -> Path:
    """The Wan 2.1 VAE architecture (comfy.ldm.wan.vae.WanVAE) at base width 8, for VAELoader."""
    import comfy.ldm.wan.vae as wan_vae
    return _save(_random(wan_vae.WanVAE(**WAN21_VAE_CONFIG), seed).state_dict(), path)


def write_taew2_2(path: Path, seed: int = 23) -> Path:
    """A TAEHV-architecture VAE with 48 latent channels: what VAELoader loads as Wan 2.2's light VAE."""
    import comfy.taesd.taehv as taehv
    return _save(_random(taehv.TAEHV(latent_channels=48), seed).state_dict(), path)


def provide_wan21(base: Path) -> str:
    return provide(base, WAN21_UNET, write_tiny_wan)


def provide_wan22_5b(base: Path) -> str:
    return provide(base, WAN22_5B_UNET, lambda p: write_tiny_wan(p, WAN22_5B_TINY, seed=25))


def provide_wan21_vae(base: Path) -> str:
    return provide(base, WAN21_VAE, write_wan21_vae)


def provide_taew2_2(base: Path) -> str:
    return provide(base, WAN22_TAE, write_taew2_2)


def taew2_2_encodes() -> bool:
    """Whether this ComfyUI encodes with the 48-channel TAEHV (0.8 loads it for decoding only)."""
    import comfyui_version
    major, minor = (int(x) for x in comfyui_version.__version__.split(".")[:2])
    return (major, minor) >= (0, 9)


# ------------------------------------------------------------------------------------------ text

def tiny_umt5_clip(seed: int = 24):
    """ComfyUI's CLIP (comfy.sd.CLIP) around ComfyUI's T5 encoder in umt5-xxl's Wan setup (4096 wide,
    attention masks, padding zeroed, min 512 tokens), 1 layer, random weights; its conditioning has the
    shape Wan's real text encoder gives ([1, 512, 4096])."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.t5
    from comfy.text_encoders.sd3_clip import T5XXLTokenizer

    class TinyUMT5Tokenizer(T5XXLTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, min_length=512)
            self.embedding_key = "umt5xxl"

    class TinyWanTokenizer(comfy.sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             clip_name="umt5xxl", tokenizer=TinyUMT5Tokenizer)

    class TinyUMT5Model(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(TINY_UMT5_CONFIG),
                             dtype=dtype, special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             enable_attention_masks=True, zero_out_masked=True, model_options=model_options)

    class TinyWanTEModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=torch.float32, model_options=model_options, name="umt5xxl",
                             clip_model=TinyUMT5Model)

    target = comfy.supported_models_base.ClipTarget(TinyWanTokenizer, TinyWanTEModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    with torch.no_grad():   # in a prompt (inference mode) the weights are inference tensors: fill them there
        randomize_(clip.cond_stage_model, seed)
    return clip


def umt5_shaped_context(n: int = 1, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """Random conditioning of umt5-xxl's shape, for tests that feed the model directly."""
    return torch.randn(n, tokens, 4096, generator=torch.Generator().manual_seed(seed))


TINY_UMT5_NODE = "DojoTestTinyUMT5"
_CLIPS: dict = {}


def register_tiny_umt5_node(comfy) -> str:
    """A test-only loader node in the booted ComfyUI's registry that outputs `tiny_umt5_clip()`: graphs
    that load umt5-xxl with CLIPLoader type "wan" run with it in the loader's place (see the module
    docstring for why no tiny file loads there). Returns its class type."""
    class TinyUMT5Loader:
        RETURN_TYPES = ("CLIP",)
        FUNCTION = "load"
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            if "clip" not in _CLIPS:
                _CLIPS["clip"] = tiny_umt5_clip()
            return (_CLIPS["clip"],)

    comfy.nodes.NODE_CLASS_MAPPINGS.setdefault(TINY_UMT5_NODE, TinyUMT5Loader)
    return TINY_UMT5_NODE
