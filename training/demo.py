"""The README's main job: a small CPU training run on the bundled sample data with an embedded tiny model.

It trains a LoRA on a tiny random-weight SD1.5-architecture UNet (built from a config in
`tiny_models.py`) to denoise the VAE latents of the images in sample_data/stamps, then writes the LoRA
(kohya keys, the layout ComfyUI loads) and a loss plot. The model is random, so the point is the
pipeline and the falling loss, not pretty pictures. In ComfyUI the nodes drive the same engine with the
graph's own VAE, text encoder and MODEL.

    python -m comfyui_dojo.training.demo [--steps 150] [--output out/demo]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import tiny_models
from .adapters import AdapterConfig, attach_adapter
from .batches import BatchSchedule, Sample, step_generator
from .diffusers_models import DiffusersUNet
from .files import next_free_path, save_safetensors_new, write_new_file
from .loop import Callbacks, Precision, TrainConfig, diffusion_loss, train
from .lora_formats import kohya_keys
from .loss_plot import render_loss_plot
from .protocol import Conditioning, TargetPreset

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "sample_data" / "stamps"
TRIGGER = "DojoStamp"
RESOLUTION = 64


def load_sample_images(folder: Path, trigger: str) -> list[tuple[torch.Tensor, str]]:
    """Images as [3, H, W] in [-1, 1] with their captions (sidecar .txt, [trigger] substituted; else the
    trigger word). The full dataset engine (buckets, video, caption rules) replaces this for the nodes."""
    items = []
    for path in sorted(folder.glob("*.png")):
        img = Image.open(path).convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8-sig").strip().replace("[trigger]", trigger) \
            if sidecar.exists() else trigger
        items.append((pixels, caption))
    if not items:
        raise SystemExit(f"no .png images in {folder}")
    return items


def demo_token_ids(caption: str, vocab_size: int, length: int = 77) -> torch.Tensor:
    """A byte-level stand-in tokenizer for the demo's random text encoder (no tokenizer files ship)."""
    ids = [0] + [2 + b % (vocab_size - 2) for b in caption.encode("utf-8")][: length - 2] + [1]
    return torch.tensor(ids + [1] * (length - len(ids)))


def encode_dataset(items, vae, text_encoder) -> list[Sample]:
    """Encode once: VAE latents and text hidden states, cached for every training step."""
    samples = []
    with torch.no_grad():
        for pixels, caption in items:
            latent = vae.encode(pixels[None]).latent_dist.mean[0] * vae.config.scaling_factor
            ids = demo_token_ids(caption, text_encoder.config.vocab_size)
            context = text_encoder(ids[None]).last_hidden_state
            samples.append(Sample(latent, Conditioning(context)))
    return samples


def fixed_batch_loss(model, samples, seed: int = 1234) -> float:
    """Loss on every sample at fixed noise and timesteps: comparable before and after training."""
    g = step_generator(seed, 0)
    latents = torch.stack([s.latent for s in samples])
    cond = Conditioning(torch.cat([s.cond.context for s in samples]))
    t = torch.linspace(0.05, 0.95, len(samples))
    noise = torch.randn(latents.shape, generator=g)
    with torch.no_grad():
        return diffusion_loss(model, latents, cond, t, noise).item()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def warmup_for(steps: int) -> int:
    """Warm-up of a tenth of the run, at most 10 steps (and none for runs under 10 steps)."""
    return min(10, steps // 10)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=150, help="training steps, 1 or more")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=SAMPLE_DATA)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "out" / "demo")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()

    items = load_sample_images(args.data, TRIGGER)
    vae, text_encoder = tiny_models.tiny_vae(seed=1), tiny_models.tiny_clip_text_model(seed=2)
    samples = encode_dataset(items, vae, text_encoder)
    model = DiffusersUNet(tiny_models.tiny_sd15_unet(seed=3))
    print(f"dataset: {len(samples)} images from {args.data} -> latents {tuple(samples[0].latent.shape)}")

    adapter = attach_adapter(model.unet, model.adaptable_modules(TargetPreset.ATTENTION_MLP),
                             AdapterConfig(rank=args.rank, alpha=args.rank), seed=args.seed)
    config = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=warmup_for(args.steps), seed=args.seed,
                         precision=Precision.FP32)
    before = fixed_batch_loss(model, samples)

    def report(step, loss, lr):
        if step == 1 or step % 25 == 0 or step == config.steps:
            print(f"step {step:4d}/{config.steps}  loss {loss:.4f}  lr {lr:.2e}")

    state, _, _ = train(model, adapter, BatchSchedule(samples, args.batch_size, args.seed), config,
                        callbacks=Callbacks(on_step=report))
    after = fixed_batch_loss(model, samples)
    print(f"fixed-batch loss: {before:.4f} before -> {after:.4f} after ({100 * (1 - after / before):.1f}% lower)")

    metadata = {"dojo_family": model.family.value, "dojo_trigger_word": TRIGGER, "dojo_steps": str(state.step),
                "ss_network_dim": str(args.rank), "ss_network_alpha": str(args.rank),
                "ss_learning_rate": str(args.lr), "ss_num_train_images": str(len(samples)),
                "dojo_base_model": "tiny random SD1.5-architecture UNet (demo)"}
    lora_path = save_safetensors_new(next_free_path(args.output, "dojo_demo_lora", ".safetensors"),
                                     kohya_keys(adapter.low_rank_factors()), metadata)
    plot_path = write_new_file(next_free_path(args.output, "dojo_demo_loss", ".png"),
                               lambda tmp: render_loss_plot(state.losses).save(tmp, format="PNG"))
    adapter.detach()
    print(f"wrote {lora_path}\nwrote {plot_path}\ndone in {time.time() - start:.1f} s")
    return after < before


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
