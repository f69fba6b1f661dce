"""Small shared builders for engine tests: a tiny SD1.5 UNet and a fixed cached dataset."""
import os

import torch

from comfyui_dojo.training import tiny_models
from comfyui_dojo.training.batches import Sample
from comfyui_dojo.training.diffusers_models import DiffusersUNet
from comfyui_dojo.training.protocol import Conditioning


def tiny_unet_model(seed=3):
    """$DOJO_TEST_MODEL_SEED shifts the seed, as for the integration tier's tiny models: only for checking
    that learning margins hold for other random models."""
    return DiffusersUNet(tiny_models.tiny_sd15_unet(seed=seed + 1000 * int(os.environ.get("DOJO_TEST_MODEL_SEED") or 0)))


def tiny_samples(n=6, size=8, seed=0):
    """Latents with a learnable structure (smooth patterns), paired with fixed random contexts."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        base = torch.stack([torch.sin(3 * xx + i), torch.cos(2 * yy - i), xx * yy, xx + yy]) * 0.8
        samples.append(Sample(base, Conditioning(torch.randn(1, 5, 32, generator=g))))
    return samples
