"""An encoded dataset: what the encode node caches and the train nodes consume.

Latents are stored as the VAE produced them (the model's own `process_latent_in` is applied by the
trainer, so one cache serves any model of the latent family); conditionings are the text encoder's
outputs per caption. Training makes no VAE or text-encoder call.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .batches import Sample


@dataclass
class EncodedDataset:
    samples: list[Sample]
    captions: list[str]
    fingerprint: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.samples) != len(self.captions):
            raise ValueError(f"{len(self.samples)} samples but {len(self.captions)} captions")
        if not self.fingerprint:
            self.fingerprint = fingerprint_samples(self.samples, self.captions)

    def __len__(self):
        return len(self.samples)


def fingerprint_samples(samples: list[Sample], captions: list[str]) -> str:
    """A content hash of latents and captions: what a checkpoint records to refuse a foreign resume."""
    h = hashlib.sha256()
    for sample, caption in zip(samples, captions):
        h.update(caption.encode("utf-8"))
        latent = sample.latent.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(latent.shape)).encode())
        h.update(latent.numpy().tobytes())
    return h.hexdigest()[:16]
