"""Issue 18's criteria for a model family, as checks any family's test file calls with its tiny model
patcher (a ComfyUI ModelPatcher, as its loaders return it) and a few encoded samples:

(a) `check_learns`: training lowers a fixed-batch loss well below the base's, and (b) holds around it;
    returns the run's result (its LoRA state is `result.lora`);
(b) `base_unchanged`: around anything that trains, the base model's outputs and state dict stay
    bit-identical (and its modules and requires_grad flags);
(c) `check_gradients`: one step's LoRA gradients through Dojo's training region (protection, with and
    without gradient checkpointing) equal an out-of-place float64 reference, per block;
(d) `check_strength_zero`: the LoRA applied through ComfyUI's LoRA path at strength 0 is exactly the base;
(e) `check_loraloader`: the file saved by Dojo Save LoRA loads in ComfyUI's own LoraLoaderModelOnly node
    with zero "lora key not loaded" lines (captured by the pack's `capture_lora_warnings`) and changes
    the output.

Each check asserts; none is skipped. Samples may mix latent shapes (images and clips): losses and
outputs are taken per shape, as training batches them.
"""
from __future__ import annotations

import importlib
import re
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch

MODULES = ("nodes.lora_training", "nodes.lora_nodes", "nodes.train_lora", "nodes.comfy_model", "nodes.comfy_compat",
           "nodes.grad_protection", "training.protocol", "training.batches", "training.encoded",
           "training.adapters", "training.loop", "training.grad_safety", "training.timesteps", "training.families")


def pack(comfy) -> types.SimpleNamespace:
    """The pack modules the checks use, by their last name (dojo.lora_training, dojo.comfy_compat, ...):
    the `dojo` every check takes."""
    name = sys.modules[comfy.pack_module_name()].__name__
    return types.SimpleNamespace(**{m.split(".")[-1]: importlib.import_module(f"{name}.{m}") for m in MODULES})


def lora_modules(lora) -> int:
    """How many layers a LoRA file adapts (its down halves; kohya-style files also hold `.alpha`)."""
    return sum(k.endswith((".lora_down.weight", ".lora_A.weight")) for k in lora)


def patch_count(patcher) -> int:
    """How many LoRA patches ComfyUI holds: one per module of the file (a file that splits a fused layer,
    Z-Image's to_q / to_k / to_v on ComfyUI's qkv, puts several patches on one weight)."""
    return sum(len(p) for p in patcher.patches.values())


def lora_job(dojo, steps: int, lr: float = 1e-2, rank: int = 4, **kw):
    """A plain fp32 LoRA job on every linear of the family's blocks, batch 2."""
    return dojo.lora_training.LoraJob(
        adapter=dojo.adapters.AdapterConfig(rank=rank, alpha=rank),
        targets=dojo.protocol.TargetPreset.ALL_LINEAR,
        train=dojo.loop.TrainConfig(steps=steps, learning_rate=lr, precision=dojo.loop.Precision.FP32, seed=1),
        batch_size=2, **kw)


def groups(data) -> dict[tuple, list]:
    """The samples by latent shape, in a fixed order (the buckets training draws batches from)."""
    by_shape: dict[tuple, list] = {}
    for s in data.samples:
        by_shape.setdefault(tuple(s.latent.shape), []).append(s)
    return dict(sorted(by_shape.items()))


def _batches(dojo, patcher, data, seed: int):
    """Per shape: (model-space latents, conditioning, timesteps, noise), all fixed by `seed`."""
    for k, (shape, samples) in enumerate(groups(data).items()):
        latents = torch.stack([patcher.model.process_latent_in(s.latent[None].float())[0] for s in samples])
        cond = dojo.batches.collate(samples, list(range(len(samples)))).cond
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + k))
        yield shape, latents, cond, torch.linspace(0.2, 0.8, len(samples)), noise


def fixed_loss(dojo, patcher, data, seed: int = 3) -> float:
    """The loss over every sample at fixed noise and timesteps, one batch per latent shape."""
    dojo.comfy_compat.load_for_compute(patcher)  # as sampling does: applies this patcher's LoRA patches
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    total, count = 0.0, 0
    for _, latents, cond, t, noise in _batches(dojo, patcher, data, seed):
        with torch.inference_mode():
            loss = dojo.loop.diffusion_loss(view, latents, cond, t, noise).item()
        total, count = total + loss * len(latents), count + len(latents)
    return total / count


def outputs(dojo, patcher, data, seed: int = 7) -> dict[tuple, torch.Tensor]:
    """The model's prediction per latent shape for fixed noisy inputs and the samples' conditioning."""
    dojo.comfy_compat.load_for_compute(patcher)
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    result = {}
    for shape, latents, cond, t, noise in _batches(dojo, patcher, data, seed):
        with torch.inference_mode():
            result[shape] = view.predict(view.schedule.add_noise(latents, noise, t), t, cond)
    return result


def _same_outputs(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- (a) it learns --------------------------------------------------------------------------------

def check_learns(dojo, patcher, data, job, factor: float = 0.85):
    """(a) Train `job` on `data` (the base model is checked unchanged by it, (b)); the LoRA, applied
    through ComfyUI's LoRA path with every key loaded, brings the fixed-batch loss below `factor` times
    the base model's. Returns the LoraResult."""
    before = fixed_loss(dojo, patcher, data)
    with base_unchanged(dojo, patcher, data):
        result = dojo.lora_training.train_lora(patcher, data, job)
    assert result.steps_done == job.train.steps and not result.cancelled
    with dojo.comfy_compat.capture_lora_warnings() as unloaded:
        trained, _ = dojo.comfy_compat.apply_lora(patcher, None, result.lora, 1.0, 0.0)
    assert unloaded == [], unloaded[:3]
    assert patch_count(trained) == lora_modules(result.lora) > 0
    after = fixed_loss(dojo, trained, data)
    assert after < factor * before, (before, after, result.losses[:3], result.losses[-3:])
    return result


# --- (b) the base model is untouched ----------------------------------------------------------------

def _base_state(dojo, patcher, data):
    net = patcher.model.diffusion_model
    return (outputs(dojo, patcher, data),
            {k: v.detach().clone() for k, v in net.state_dict().items()},
            dict(net.named_modules()),
            {n: p.requires_grad for n, p in patcher.model.named_parameters()})


@contextmanager
def base_unchanged(dojo, patcher, data):
    """(b) Around the block: the base model's outputs (every latent shape of `data`) and its state dict
    are bit-identical afterwards, with the same module objects and requires_grad flags. (Put only Dojo's
    own work inside: ComfyUI 0.8 hands weights back from its LoRA patching with requires_grad off.)"""
    before_out, before_state, modules, flags = _base_state(dojo, patcher, data)
    yield
    after_out, after_state, after_modules, after_flags = _base_state(dojo, patcher, data)
    assert _same_outputs(after_out, before_out), "the base model's outputs changed"
    assert after_state.keys() == before_state.keys()
    changed = [k for k, v in before_state.items()
               if v.dtype != after_state[k].dtype or not torch.equal(v, after_state[k])]
    assert changed == [], f"{len(changed)} base tensors changed, e.g. {changed[:3]}"
    assert after_modules == modules, [n for n in modules if after_modules.get(n) is not modules[n]][:3]
    assert after_flags == flags, [(n, flags[n], after_flags.get(n)) for n in flags if after_flags.get(n) != flags[n]][:3]


# --- (c) gradients ----------------------------------------------------------------------------------

def float64_copy(patcher):
    """A float64 copy of the patcher's BaseModel in its own ModelPatcher (the shared model is untouched):
    built from the same ComfyUI model config, holding the same weights. ComfyUI casts inputs to the
    network's recorded dtype, so that is set too."""
    import comfy.model_patcher
    with torch.inference_mode(False):
        model = patcher.model.model_config.get_model({})
        missing, unexpected = model.load_state_dict(patcher.model.state_dict(), strict=False)
        assert not unexpected and not [k for k in missing if k.startswith("diffusion_model.")], (missing, unexpected)
        model = model.to(torch.float64)
    if hasattr(model.diffusion_model, "dtype"):
        model.diffusion_model.dtype = torch.float64
    model.manual_cast_dtype = None
    return comfy.model_patcher.ModelPatcher(model, load_device=patcher.load_device,
                                            offload_device=patcher.offload_device)


def _random_factors(adapter, seed: int, scale: float = 0.2) -> dict:
    """Non-zero (down, up) for every adapted layer: at peft's initialisation (up = 0) no gradient reaches
    the down halves, and a check that compares zeros proves nothing."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (down, up) in adapter.low_rank_factors().items():
        out[name] = (torch.randn(down.shape, generator=g) * scale, torch.randn(up.shape, generator=g) * scale)
    return out


def _step_gradients(dojo, patcher, data, factors, region, precision, preset, seed: int):
    """One training step's gradients of the adapter parameters for `factors`, inside `region(view)`,
    with the model and adapter in `precision`."""
    with dojo.comfy_model.trainable_view(patcher) as view:
        adapter = dojo.adapters.attach_adapter(view.diffusion_model, view.adaptable_modules(preset),
                                               dojo.adapters.AdapterConfig(rank=2, alpha=2), seed=seed)
        try:
            adapter.load_low_rank_factors(factors)
            for p in adapter.parameters():
                p.data = p.data.to(precision)
            loss = 0.0
            with region(view):
                for _, latents, cond, t, noise in _batches(dojo, view.patcher, data, seed):
                    loss = loss + dojo.loop.diffusion_loss(view, latents, cond, t, noise)
                loss.backward()
            # A layer whose output reaches no loss has no gradient (Qwen-Image's last block: its text stream
            # is discarded, so its text MLP gets none): zero (see `dead` in check_gradients).
            grads = {name: torch.zeros(p.shape, dtype=torch.float64) if p.grad is None
                     else p.grad.detach().double().clone() for name, p in adapter.named_parameters()}
        finally:
            adapter.detach()
    return grads, view.spec


def block_of(name: str, spec) -> str:
    """The block a parameter belongs to: `<list>.<i>` of the spec's block lists (or UNet containers)."""
    for prefix in spec.block_lists + spec.unet_blocks:
        m = re.match(rf"({re.escape(prefix)}(\.\d+)?)\.", name)
        if m:
            return m.group(1)
    return "outside blocks"


def per_block_errors(got: dict, ref: dict, spec, floor: float = 1e-3) -> dict[str, float]:
    """Per block: |g - g_ref| / |g_ref| over all adapter gradients in it (Frobenius norms). A block whose
    true gradient is below `floor` of the whole step's is measured against that floor, not against its
    own size: its gradient can be exactly zero (SD's ResBlock time embedding feeding a GroupNorm of one
    channel per group cancels), and then any float32 rounding would count as an infinite error."""
    diff, norm = {}, {}
    for name, r in ref.items():
        block = block_of(name, spec)
        diff[block] = diff.get(block, 0.0) + (got[name] - r).pow(2).sum().item()
        norm[block] = norm.get(block, 0.0) + r.pow(2).sum().item()
    least = floor * sum(norm.values()) ** 0.5
    return {b: diff[b] ** 0.5 / max(norm[b] ** 0.5, least) for b in diff}


def check_gradients(dojo, patcher, data, *, reference_patcher=None, tolerance: float = 1e-4, seed: int = 0,
                    checkpointing: tuple[bool, ...] = (False, True)) -> dict:
    """(c) One step's LoRA gradients (every linear of the blocks, non-zero factors) through Dojo's
    training region (`training_region` with the model view's spec: copy-on-write protection where the
    spec says blocks write in place, block checkpointing on and off) equal the out-of-place float64
    reference, per block relative error < `tolerance`. The reference runs the float64 copy
    `reference_patcher` (default `float64_copy(patcher)`; pass your own where the model's forward cannot
    run in float64 as is) with every autograd-saved tensor copied when saved (`clone_all_saved_tensors`),
    so no later in-place write can change what backward sees. Returns {checkpointing: errors}."""
    preset = dojo.protocol.TargetPreset.ALL_LINEAR
    cc, protection, safety = dojo.comfy_compat, dojo.grad_protection, dojo.grad_safety
    with dojo.comfy_model.trainable_view(patcher) as view:
        probe = dojo.adapters.attach_adapter(view.diffusion_model, view.adaptable_modules(preset),
                                             dojo.adapters.AdapterConfig(rank=2, alpha=2), seed=seed)
        try:
            factors = _random_factors(probe, seed)
        finally:
            probe.detach()

    @contextmanager
    def reference_region(view):
        with cc.comfy_training_mode(), safety.clone_all_saved_tensors(cc.training_substitutions()):
            yield

    reference_patcher = reference_patcher or float64_copy(patcher)
    ref, spec = _step_gradients(dojo, reference_patcher, data, {n: (d.double(), u.double()) for n, (d, u) in
                                                                 factors.items()},
                                reference_region, torch.float64, preset, seed)
    # A layer whose output reaches the loss only through a stream the model discards (Qwen-Image's last
    # block: its text queries and text output projection) gets exactly zero gradient; Dojo must give it
    # exactly zero too. Anything beyond a few such layers means the check compares nothing.
    dead = [n for n, g in ref.items() if not g.abs().max() > 0]
    assert len(ref) >= 4 and len(dead) <= len(ref) // 4, ("the reference has zero gradients", dead[:6])
    report = {}
    for gc in checkpointing:
        got, _ = _step_gradients(
            dojo, patcher, data, factors,
            lambda v, gc=gc: protection.training_region(v.patcher, gc, 0, cc.compute_device(v.patcher), v.spec),
            torch.float32, preset, seed)
        assert got.keys() == ref.keys()
        assert all(not got[n].abs().max() > 0 for n in dead), [n for n in dead if got[n].abs().max() > 0]
        errors = per_block_errors(got, ref, spec)
        assert len(errors) >= 2, errors
        worst = max(errors, key=errors.get)
        assert errors[worst] < tolerance, (f"checkpointing {'on' if gc else 'off'}: block {worst} gradient "
                                           f"relative error {errors[worst]:.2e}", errors)
        print(f"gradients vs the float64 reference, checkpointing {'on' if gc else 'off'}: {len(errors)} blocks, "
              f"worst {worst} {errors[worst]:.1e}")
        report[gc] = errors
    return report


# --- (d) strength 0 ---------------------------------------------------------------------------------

def check_strength_zero(dojo, patcher, data, lora) -> None:
    """(d) ComfyUI's LoRA path at strength 0 gives exactly the base model's outputs; at 1 it changes them."""
    base = outputs(dojo, patcher, data)
    zero, _ = dojo.comfy_compat.apply_lora(patcher, None, lora, 0.0, 0.0)
    one, _ = dojo.comfy_compat.apply_lora(patcher, None, lora, 1.0, 0.0)
    assert _same_outputs(outputs(dojo, zero, data), base), "strength 0 is not the base model"
    assert not _same_outputs(outputs(dojo, one, data), base), "strength 1 changes nothing"
    outputs(dojo, patcher, data)  # reload the base for whoever runs next


# --- (e) the saved file in ComfyUI's own loader -------------------------------------------------------

def check_loraloader(comfy, dojo, patcher, data, lora, prefix: str, min_change: float = 1e-4) -> str:
    """(e) Save `lora` with Dojo Save LoRA, load it with ComfyUI's LoraLoaderModelOnly node: every key
    loads (no "lora key not loaded" line), one patch per adapted layer, and the outputs change by more
    than `min_change` for every latent shape. Returns the file name under models/loras."""
    name = dojo.lora_nodes.DojoSaveLoRA.execute(lora, prefix, "fp32").result[0]
    path = Path(comfy.folder_paths.get_folder_paths("loras")[0]) / name
    assert set(safetensors.torch.load_file(str(path))) == set(lora)
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]()
    with dojo.comfy_compat.capture_lora_warnings() as unloaded:
        loaded = getattr(loader, loader.FUNCTION)(patcher, name, 1.0)[0]
    assert unloaded == [], unloaded[:3]
    assert patch_count(loaded) == lora_modules(lora) > 0
    base, changed = outputs(dojo, patcher, data), outputs(dojo, loaded, data)
    for shape in base:
        assert (changed[shape] - base[shape]).abs().max() > min_change, f"the file changes nothing for {shape}"
    outputs(dojo, patcher, data)
    return name
