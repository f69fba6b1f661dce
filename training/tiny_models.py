"""Tiny random-weight models of the real architectures, built from configs (nothing is downloaded).

Engine tests train these, and the demo uses them as its embedded model. Weights are drawn inside
`torch.random.fork_rng`, so building a model never disturbs the caller's global RNG stream.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_sd15_unet(seed: int = 0, cross_attention_dim: int = 32):
    """An SD1.5-shaped UNet2DConditionModel (4 latent channels, cross-attention) with ~0.8 M params."""
    from diffusers import UNet2DConditionModel
    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim, attention_head_dim=8,
        ).eval()


def tiny_sdxl_unet(seed: int = 0, cross_attention_dim: int = 32, pooled_dim: int = 32):
    """An SDXL-shaped UNet: text_time additional embedding (pooled text + 6 size ids)."""
    from diffusers import UNet2DConditionModel
    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim, attention_head_dim=8,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=pooled_dim + 6 * 8,
        ).eval()


def tiny_flux_transformer(seed: int = 0, context_dim: int = 32, pooled_dim: int = 32, guidance: bool = True):
    """A Flux.1-shaped FluxTransformer2DModel: 1 double + 1 single block, 16 latent channels."""
    from diffusers import FluxTransformer2DModel
    with _seeded(seed):
        return FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=context_dim,
            pooled_projection_dim=pooled_dim, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6),
        ).eval()


def tiny_clip_text_model(seed: int = 0, hidden_size: int = 32, vocab_size: int = 1000):
    """A CLIPTextModel with the real architecture and a small width."""
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with _seeded(seed):
        return CLIPTextModel(config).eval()


def tiny_vae(seed: int = 0):
    """An AutoencoderKL (SD VAE architecture) with 4 latent channels and 4x downsampling."""
    from diffusers import AutoencoderKL
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
            norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        ).eval()
