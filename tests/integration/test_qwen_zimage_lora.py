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
