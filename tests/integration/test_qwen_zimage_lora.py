"""Qwen-Image and Z-Image as first-class families (issue 18) in real ComfyUI (0.33 and 0.8 both have them),
with the stand-ins of tiny_qwen.py: ComfyUI's loaders detect the files, the tiny text encoders are
ComfyUI's own encoder classes, and the training checks run on ComfyUI's own models."""
import importlib
import sys

import pytest
import torch

import family_checks
from test_lora_diffusers_roundtrip import from_comfy_key_map, run_roundtrip

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


# --- the pack over ComfyUI's own tiny models: issue 18's criterion 1 (family_checks) ----------------

@pytest.fixture(scope="module")
def dojo(comfy):
    d = family_checks.pack(comfy)
    for name in ("dataset_nodes", "lora_formats"):
        setattr(d, name, importlib.import_module(f"{sys.modules[comfy.pack_module_name()].__name__}."
                                                 f"{'nodes' if name == 'dataset_nodes' else 'training'}.{name}"))
    return d


def tiny_patcher(family):
    import tiny_qwen
    return tiny_qwen.tiny_qwen_image_patcher() if family == "qwen_image" else tiny_qwen.tiny_z_image_patcher()


def latent_shape(family, h=8, w=8):
    # Qwen-Image's latents come from Wan 2.1's VAE, which gives even a still image a time axis.
    return (16, 1, h, w) if family == "qwen_image" else (16, h, w)


# Per latent size, captions of one token length (training batches never mix text lengths; the checks
# batch per latent shape); the two sizes' lengths differ.
CAPTIONS = {(8, 8): ["a red square", "a blue circle"],
            (8, 12): ["a red square on green grass", "a blue circle on brown sand"]}


def dataset(dojo, family, clip):
    """Four samples: smooth patterned latents of two sizes, conditioned on real encodings of the tiny
    text encoder (ComfyUI's own: the chat template, and the attention mask where ComfyUI returns one)."""
    samples, captions, lengths = [], [], {}
    for (h, w), texts in CAPTIONS.items():
        for i, caption in enumerate(texts):
            y, x = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
            frame = torch.sin(3 * x + i + w)[None, :] * torch.cos(2 * y - i)[:, None]
            channels = (1 + torch.arange(16) / 16).reshape(16, 1, 1) * 2
            latent = (channels * frame).reshape(latent_shape(family, h, w)).contiguous()
            out = clip.encode_from_tokens(clip.tokenize(caption), return_dict=True)
            cond = dojo.dataset_nodes.to_conditioning(out.pop("cond"), out)
            lengths.setdefault((h, w), set()).add(cond.context.shape[1])
            samples.append(dojo.batches.Sample(latent, cond))
            captions.append(caption)
    assert all(len(v) == 1 for v in lengths.values()) and len(set.union(*lengths.values())) == 2, lengths
    return dojo.encoded.EncodedDataset(samples, captions)


def job(dojo, steps, lr=3e-2):
    return family_checks.lora_job(dojo, steps, lr=lr, gradient_checkpointing=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_learns_leaves_the_base_and_loads_in_comfyui(comfy, dojo, family):
    """Issue 18 criterion 1: the fixed-batch loss drops well below the base's, the base model is
    bit-identical afterwards, strength 0 is exactly the base, and the saved file loads in ComfyUI's
    LoraLoaderModelOnly with no "lora key not loaded" line."""
    patcher, clip = tiny_patcher(family), tiny_clip(family)
    data = dataset(dojo, family, clip)
    view = dojo.comfy_model.ComfyDenoisingModel(patcher)
    assert view.spec.family.value == family and not view.spec.generic
    result = family_checks.check_learns(dojo, patcher, data, job(dojo, steps=60), factor=0.75)  # (b) inside
    family_checks.check_strength_zero(dojo, patcher, data, result.lora)
    family_checks.check_loraloader(comfy, dojo, patcher, data, result.lora, f"dojo_test/{family}")


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_the_out_of_place_float64_reference(comfy, dojo, family):
    patcher = tiny_patcher(family)
    data = dataset(dojo, family, tiny_clip(family))
    with family_checks.base_unchanged(dojo, patcher, data):
        report = family_checks.check_gradients(dojo, patcher, data)
    blocks = {b for errors in report.values() for b in errors}
    assert len(blocks) == len(dojo.grad_protection.transformer_blocks(patcher, spec=dojo.families.spec(family)))


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_keys_load_on_the_detectable_models(comfy, dojo, detectable_unets, family):
    """The file layout on the models UNETLoader returns for the detectable files, every block preset:
    ComfyUI maps every key (no "lora key not loaded") and patches one weight per module; Dojo reads its
    own file back into the same factors (continue_from)."""
    model = load_unet(comfy, detectable_unets[family])
    view = dojo.comfy_model.ComfyDenoisingModel(model)
    assert view.spec.family.value == family
    for preset in dojo.protocol.TargetPreset:
        modules = view.adaptable_modules(preset)
        assert modules
        factors = {n: (torch.randn(2, m.in_features) * 1e-3, torch.randn(m.out_features, 2) * 1e-3)
                   for n, m in modules.items()}
        lora = dojo.lora_formats.lora_state_dict(view.spec, factors)
        with dojo.comfy_compat.capture_lora_warnings() as unloaded:
            patched, _ = dojo.comfy_compat.apply_lora(model, None, lora, 1.0, 0.0)
        assert unloaded == [] and len(patched.patches) == len(modules), preset
        back = dojo.lora_formats.factors_from_state_dict(view.spec, lora, list(modules))
        assert back.keys() == factors.keys()
        assert all(torch.equal(back[n][0], f[0]) and torch.equal(back[n][1], f[1]) for n, f in factors.items())


# --- diffusers: the file loads in QwenImagePipeline / ZImagePipeline with the same output change ---------

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
        return model, from_comfy_key_map(dict(patcher.model.diffusion_model.state_dict()), key_map)

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
    modules = run_roundtrip(dojo, family, preset, tmp_path)
    if family is ZImageDiffusers:
        assert any(n.endswith("attention.qkv") for n in modules)   # the fused qkv, split in the file
