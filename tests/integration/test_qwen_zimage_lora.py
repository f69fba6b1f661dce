"""Qwen-Image and Z-Image as first-class families (issue 18) in real ComfyUI (0.33 and 0.8 both have them),
with the stand-ins of tiny_qwen.py: ComfyUI's loaders detect the files, the tiny text encoders are
ComfyUI's own encoder classes, and the training checks run on ComfyUI's own models."""
import pytest
import torch

pytestmark = pytest.mark.integration

FAMILIES = ("qwen_image", "z_image")
CONFIG_NAMES = {"qwen_image": "QwenImage", "z_image": "ZImage"}


@pytest.fixture(scope="module")
def detectable_unets(comfy):
    """models/diffusion_models: the smallest Qwen-Image and Z-Image files UNETLoader detects."""
    import tiny_qwen
    return {"qwen_image": tiny_qwen.provide_qwen_image_unet(comfy.base),
            "z_image": tiny_qwen.provide_z_image_unet(comfy.base)}


def load_unet(comfy, name: str):
    """UNETLoader with fp8 weights: the detectable files are large (0.4 / 0.9 G parameters), and what is
    checked on them (detection, LoRA key mapping) needs no arithmetic."""
    import nodes
    (model,) = nodes.UNETLoader().load_unet(name, "fp8_e4m3fn")
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_loader_detects_the_stand_ins(comfy, detectable_unets, family):
    model = load_unet(comfy, detectable_unets[family])
    assert type(model.model.model_config).__name__ == CONFIG_NAMES[family]


def tiny_clip(family):
    import tiny_qwen
    return tiny_qwen.tiny_qwen_image_clip() if family == "qwen_image" else tiny_qwen.tiny_z_image_clip()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_text_encoders_are_comfyuis_own(comfy, family):
    """The tiny encoders go through ComfyUI's tokenizer, chat template and encoder: captions of different
    lengths give contexts of different lengths, 64 wide; Qwen-Image strips its system template (the
    context is shorter than the tokens), Z-Image returns an attention mask as long as its context."""
    clip = tiny_clip(family)
    outs = {}
    for text in ("a red square", "a red square on green grass under a blue evening sky"):
        tokens = clip.tokenize(text)
        n_tokens = len(next(iter(tokens.values()))[0])
        out = clip.encode_from_tokens(tokens, return_dict=True)
        assert out["cond"].shape[0] == 1 and out["cond"].shape[2] == 64
        if family == "qwen_image":
            assert out["cond"].shape[1] < n_tokens - 10   # the system prompt is not part of the context
        else:
            assert out["cond"].shape[1] == n_tokens
            assert out["attention_mask"].shape == out["cond"].shape[:2] and bool(out["attention_mask"].all())
        outs[text] = out["cond"]
    short, long = outs.values()
    assert long.shape[1] > short.shape[1]


# --- the pack over ComfyUI's own tiny models --------------------------------------------------------

import importlib
import sys


@pytest.fixture(scope="module")
def dojo(comfy):
    pack = sys.modules[comfy.pack_module_name()].__name__
    names = ("nodes.lora_training", "nodes.comfy_model", "nodes.comfy_compat", "nodes.grad_protection",
             "nodes.train_lora", "training.protocol", "training.batches", "training.encoded", "training.adapters",
             "training.loop", "training.grad_safety", "training.lora_formats", "training.families",
             "nodes.dataset_nodes")
    mods = {name: importlib.import_module(f"{pack}.{name}") for name in names}
    return type("Dojo", (), {k.split(".")[-1]: v for k, v in mods.items()})


def tiny_patcher(family):
    import tiny_qwen
    return tiny_qwen.tiny_qwen_image_patcher() if family == "qwen_image" else tiny_qwen.tiny_z_image_patcher()


def latent_shape(family, h=8, w=8):
    # Qwen-Image's latents come from Wan 2.1's VAE, which gives even a still image a time axis.
    return (16, 1, h, w) if family == "qwen_image" else (16, h, w)


CAPTIONS = ["a red square", "a red square on green grass", "a blue circle", "the red square again, larger"]


def dataset(dojo, family, clip):
    """Four samples: smooth patterned latents of two sizes, conditioned on real encodings of the tiny
    text encoder (ComfyUI's own: variable lengths, with the attention mask where ComfyUI returns one)."""
    samples = []
    for i, caption in enumerate(CAPTIONS):
        h, w = (8, 8) if i % 2 == 0 else (8, 12)
        y, x = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
        frame = torch.sin(3 * x + i)[None, :] * torch.cos(2 * y - i)[:, None]
        channels = (1 + torch.arange(16) / 16).reshape(16, 1, 1) * 2
        latent = (channels * frame).reshape(latent_shape(family, h, w)).contiguous()
        out = clip.encode_from_tokens(clip.tokenize(caption), return_dict=True)
        cond = dojo.dataset_nodes.to_conditioning(out.pop("cond"), out)
        samples.append(dojo.batches.Sample(latent, cond))
    return dojo.encoded.EncodedDataset(samples, CAPTIONS)


def groups(data):
    by_shape = {}
    for i, s in enumerate(data.samples):
        by_shape.setdefault((tuple(s.latent.shape), tuple(s.cond.context.shape)), []).append(i)
    return by_shape


def fixed_loss(dojo, patcher, data):
    """The dataset's loss at fixed noise and timesteps, one batch per (latent shape, text length)."""
    dojo.comfy_compat.load_for_compute(patcher)
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    total = 0.0
    for k, (_, indices) in enumerate(sorted(groups(data).items())):
        samples = [data.samples[i] for i in indices]
        latents = torch.stack([patcher.model.process_latent_in(s.latent[None])[0] for s in samples])
        cond = dojo.batches.collate(samples, indices).cond
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3 + k))
        with torch.inference_mode():
            loss = dojo.loop.diffusion_loss(view, latents, cond, torch.linspace(0.3, 0.7, len(samples)), noise)
        total += loss.item() * len(samples)
    return total / len(data.samples)


def outputs(dojo, patcher, data):
    """The model's prediction for a fixed noisy input per sample."""
    dojo.comfy_compat.load_for_compute(patcher)
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    g = torch.Generator().manual_seed(7)
    result = []
    for s in data.samples:
        x = torch.randn(1, *s.latent.shape, generator=g)
        with torch.inference_mode():
            result.append(view.predict(x, torch.tensor([0.6]), dojo.batches.collate([s], [0]).cond))
    return result


def job(dojo, steps, lr=2e-2, checkpointing=False):
    return dojo.lora_training.LoraJob(
        adapter=dojo.adapters.AdapterConfig(rank=4, alpha=4),
        targets=dojo.protocol.TargetPreset.ATTENTION_MLP,
        train=dojo.loop.TrainConfig(steps=steps, learning_rate=lr, precision=dojo.loop.Precision.FP32, seed=1),
        batch_size=2, gradient_checkpointing=checkpointing)


def lora_modules(lora) -> int:
    return sum(k.endswith((".lora_down.weight", ".lora_A.weight")) for k in lora)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_learns_leaves_the_base_and_loads_in_comfyui(comfy, dojo, family):
    """Issue 18 criterion 1, training side: the fixed-batch loss drops well below the base's, the base model
    is bit-identical afterwards, the file loads in ComfyUI's LoRA path (LoraLoaderModelOnly's) with no
    "lora key not loaded" line and one patched weight per trained module, and strength 0 is the base."""
    patcher, clip = tiny_patcher(family), tiny_clip(family)
    data = dataset(dojo, family, clip)
    assert len({s.cond.context.shape[1] for s in data.samples}) > 1   # captions of several lengths
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    assert view.spec.family.value == family and not view.spec.generic
    base = outputs(dojo, patcher, data)
    before = fixed_loss(dojo, patcher, data)

    result = dojo.lora_training.train_lora(patcher, data, job(dojo, steps=60, lr=3e-2, checkpointing=True))
    assert result.steps_done == 60 and not result.cancelled
    assert all(torch.equal(a, b) for a, b in zip(outputs(dojo, patcher, data), base))

    modules = view.adaptable_modules(dojo.protocol.TargetPreset.ATTENTION_MLP)
    with dojo.comfy_compat.capture_lora_warnings() as unloaded:
        trained, _ = dojo.comfy_compat.apply_lora(patcher, None, result.lora, 1.0, 0.0)
        zero, _ = dojo.comfy_compat.apply_lora(patcher, None, result.lora, 0.0, 0.0)
    assert unloaded == []
    assert len(trained.patches) == len(modules)
    after = fixed_loss(dojo, trained, data)
    assert after < 0.75 * before, (before, after, result.losses[:3], result.losses[-3:])
    assert all(torch.equal(a, b) for a, b in zip(outputs(dojo, zero, data), base))


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_keys_load_on_the_detectable_models(comfy, dojo, detectable_unets, family):
    """The file layout on the models UNETLoader returns for the detectable files, every block preset:
    ComfyUI maps every key (no "lora key not loaded") and patches one weight per module."""
    model = load_unet(comfy, detectable_unets[family])
    view = dojo.comfy_model.ComfyDenoisingModel(model)
    assert view.spec.family.value == family
    for preset in dojo.protocol.TargetPreset:
        modules = view.adaptable_modules(preset)
        assert modules
        factors = {n: (torch.zeros(2, m.in_features), torch.zeros(m.out_features, 2)) for n, m in modules.items()}
        lora = dojo.lora_formats.lora_state_dict(view.spec, factors)
        with dojo.comfy_compat.capture_lora_warnings() as unloaded:
            patched, _ = dojo.comfy_compat.apply_lora(model, None, lora, 1.0, 0.0)
        assert unloaded == [] and len(patched.patches) == len(modules), preset
        # And back: Dojo reads its own file into the same factors (continue_from).
        back = dojo.lora_formats.factors_from_state_dict(view.spec, lora, list(modules))
        assert back.keys() == factors.keys()
        assert all(back[n][0].shape == f[0].shape and back[n][1].shape == f[1].shape for n, f in factors.items())


# --- gradients: one step against an out-of-place float64 reference ---------------------------------

class HookLora:
    """x @ A @ B added to the output of every target linear (float64, through forward hooks)."""

    def __init__(self, modules: dict, seed=0, rank=2):
        g = torch.Generator().manual_seed(seed)
        self.params, self.handles = {}, []
        for name, module in modules.items():
            a = (torch.randn(module.in_features, rank, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
            b = (torch.randn(rank, module.out_features, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
            self.params[name] = (a, b)
            self.handles.append(module.register_forward_hook(lambda m, inp, out, a=a, b=b: out + (inp[0] @ a) @ b))

    def remove(self):
        for h in self.handles:
            h.remove()


def forward_inputs(family, clip, batch=2):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, *latent_shape(family), generator=g, dtype=torch.float64)
    out = clip.encode_from_tokens(clip.tokenize("a red square on green grass"), return_dict=True)
    context = out["cond"].to(torch.float64).repeat(batch, 1, 1)
    kwargs = {} if family == "qwen_image" else {"num_tokens": context.shape[1]}
    return x, torch.tensor([0.3, 0.8], dtype=torch.float64), context, kwargs


def block_of(name: str) -> str:
    return ".".join(name.split(".")[:2])


def lora_grads(net, lora, inputs, region):
    for a, b in lora.params.values():
        a.grad = b.grad = None
    x, t, context, kwargs = inputs
    with torch.inference_mode(False), torch.enable_grad(), region:
        loss = (net(x, t, context, **kwargs) ** 2).mean()
        loss.backward()
    grads = {}
    for name, (a, b) in lora.params.items():
        # (Qwen-Image's last block: its text-stream output is discarded, so its text MLP gets no gradient.)
        grads.setdefault(block_of(name), []).extend(
            [torch.zeros(p.numel(), dtype=p.dtype) if p.grad is None else p.grad.flatten() for p in (a, b)])
    return {block: torch.cat(g) for block, g in grads.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_the_out_of_place_float64_reference(comfy, dojo, family):
    """One step's LoRA gradients through ComfyUI's own blocks in Dojo's training region, with
    checkpointing on and off, equal the reference where every tensor autograd saves is copied when saved
    (out-of-place semantics whatever the blocks do in place), per block: relative error < 1e-4."""
    patcher, clip = tiny_patcher(family), tiny_clip(family)
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    net = view.diffusion_model
    dojo.comfy_compat.materialize_inference_tensors(net)
    net.double()
    modules = view.adaptable_modules(dojo.protocol.TargetPreset.ALL_LINEAR)
    lora = HookLora(modules)
    inputs = forward_inputs(family, clip)
    cc, safety = dojo.comfy_compat, dojo.grad_safety
    try:
        import contextlib
        reference_region = contextlib.ExitStack()
        reference_region.enter_context(cc.comfy_training_mode())
        reference_region.enter_context(safety.clone_all_saved_tensors(cc.rope_substitutions()))
        reference = lora_grads(net, lora, inputs, reference_region)
        blocks = {block_of(n) for n in modules}
        assert set(reference) == blocks and len(blocks) == len(dojo.grad_protection.transformer_blocks(net, view.spec))
        assert all(g.abs().max() > 0 for g in reference.values())
        for checkpointing in (False, True):
            got = lora_grads(net, lora, inputs, dojo.grad_protection.training_region(net, checkpointing, spec=view.spec))
            errors = {b: ((got[b] - reference[b]).abs().max() / reference[b].abs().max()).item() for b in reference}
            assert max(errors.values()) < 1e-4, (checkpointing, errors)
    finally:
        lora.remove()


# --- diffusers: the file loads in QwenImagePipeline / ZImagePipeline with the same output change ---------

def _from_key_map(comfy_sd, key_map):
    """ComfyUI's `*_to_diffusers` map (diffusers key -> ComfyUI key, or (key, (dim, start, length))) applied."""
    out = {}
    for diffusers_key, source in key_map.items():
        if isinstance(source, str):
            if source in comfy_sd:
                out[diffusers_key] = comfy_sd[source]
        elif source[0] in comfy_sd:
            dim, start, length = source[1]
            out[diffusers_key] = comfy_sd[source[0]].narrow(dim, start, length)
    return out


class QwenImageDiffusers:
    """ComfyUI's Qwen-Image modules carry diffusers' names: the state dict loads as it is."""
    name = "qwen_image"

    @staticmethod
    def comfy_patcher():
        import tiny_qwen
        return tiny_qwen.tiny_qwen_image_patcher(seed=3)

    @staticmethod
    def diffusers_model(patcher):
        import tiny_qwen
        from diffusers import QwenImageTransformer2DModel
        c = tiny_qwen.QWEN_IMAGE_TINY
        model = QwenImageTransformer2DModel(
            patch_size=c["patch_size"], in_channels=c["in_channels"], out_channels=c["out_channels"],
            num_layers=c["num_layers"], attention_head_dim=c["attention_head_dim"],
            num_attention_heads=c["num_attention_heads"], joint_attention_dim=c["joint_attention_dim"],
            axes_dims_rope=tuple(c["axes_dims_rope"]))
        return model, dict(patcher.model.diffusion_model.state_dict())

    @staticmethod
    def inputs(batch=2):
        g = torch.Generator().manual_seed(11)
        return dict(x=torch.randn(batch, 16, 1, 8, 8, generator=g), t=torch.tensor([0.3, 0.8][:batch]),
                    context=torch.randn(batch, 7, 64, generator=g))

    @staticmethod
    def comfy_forward(net, i):
        return net(i["x"], i["t"], i["context"])

    @staticmethod
    def diffusers_forward(model, i):
        # diffusers' Qwen-Image takes 2x2 patches packed into tokens; compare in the latent space.
        b, c, _, h, w = i["x"].shape
        packed = i["x"][:, :, 0].reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        out = model(hidden_states=packed, encoder_hidden_states=i["context"], timestep=i["t"],
                    encoder_hidden_states_mask=torch.ones(b, i["context"].shape[1]),
                    img_shapes=[[(1, h // 2, w // 2)]] * b).sample
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 1, h, w)

    @staticmethod
    def pipeline(model):
        from diffusers import QwenImagePipeline
        return QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=model)


class ZImageDiffusers:
    """ComfyUI fuses q, k, v: its own key map (comfy.utils.z_image_to_diffusers) gives diffusers' weights."""
    name = "z_image"

    @staticmethod
    def comfy_patcher():
        import tiny_qwen
        return tiny_qwen.tiny_z_image_diffusers_sized_patcher(seed=3)

    @staticmethod
    def diffusers_model(patcher):
        import comfy.utils
        import tiny_qwen
        from diffusers import ZImageTransformer2DModel
        c = tiny_qwen.Z_IMAGE_DIFFUSERS_SIZED
        model = ZImageTransformer2DModel(
            all_patch_size=(c["patch_size"],), all_f_patch_size=(1,), in_channels=c["in_channels"], dim=c["dim"],
            n_layers=c["n_layers"], n_refiner_layers=c["n_refiner_layers"], n_heads=c["n_heads"],
            n_kv_heads=c["n_kv_heads"], cap_feat_dim=c["cap_feat_dim"], axes_dims=c["axes_dims"],
            axes_lens=c["axes_lens"], rope_theta=c["rope_theta"])
        key_map = comfy.utils.z_image_to_diffusers(dict(c), output_prefix="")
        return model, _from_key_map(dict(patcher.model.diffusion_model.state_dict()), key_map)

    @staticmethod
    def inputs(batch=2):
        g = torch.Generator().manual_seed(11)
        return dict(x=torch.randn(batch, 16, 8, 8, generator=g), t=torch.tensor([0.3, 0.8][:batch]),
                    context=torch.randn(batch, 7, 64, generator=g))

    @staticmethod
    def comfy_forward(net, i):
        return net(i["x"], i["t"], i["context"], num_tokens=i["context"].shape[1])

    @staticmethod
    def diffusers_forward(model, i):
        # diffusers' Z-Image takes lists of [C, F, H, W] and the time 1 - sigma, and predicts minus the velocity
        # (ZImagePipeline negates it); ComfyUI's NextDiT does both inside.
        out = model(list(i["x"].unsqueeze(2).unbind(0)), 1 - i["t"], list(i["context"].unbind(0)), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    @staticmethod
    def pipeline(model):
        from diffusers import ZImagePipeline
        return ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=model)


@pytest.mark.parametrize("preset", ["attention", "attention_mlp", "all_linear"])
@pytest.mark.parametrize("family", [QwenImageDiffusers, ZImageDiffusers], ids=FAMILIES)
def test_lora_loads_in_diffusers_with_the_same_change(comfy, dojo, tmp_path, family, preset):
    from test_lora_diffusers_roundtrip import run_roundtrip
    modules = run_roundtrip(dojo, family, preset, tmp_path)
    if family is ZImageDiffusers:
        assert any(n.endswith("attention.qkv") for n in modules)   # the fused qkv, split in the file
