"""The engine's model protocol over ComfyUI's MODEL: family, schedule, native prediction, targets."""
import importlib
import sys

import pytest
import torch

from tiny_comfy_models import write_tiny_hunyuan_video

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hunyuan_file(comfy):
    return write_tiny_hunyuan_video(comfy.base / "models" / "diffusion_models" / "tiny_hunyuan_video.safetensors")


@pytest.fixture(scope="module")
def pack(comfy):
    return sys.modules[comfy.pack_module_name()]


def load_unet(comfy, name):
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["UNETLoader"]()
    return loader.load_unet(name, "default")[0]


def test_model_info_node_in_a_prompt(comfy, hunyuan_file):
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": hunyuan_file.name, "weight_dtype": "default"}},
        "2": {"class_type": "DojoModelInfo", "inputs": {"model": ["1", 0]}},
    }
    result = comfy.run(prompt)
    assert result.success, result.error_message()
    text = result.ui_outputs["2"]["text"][0]
    assert "family: hunyuan_video" in text
    assert "prediction: flow" in text
    assert "shift: 7.000" in text
    # 2 double blocks x (img, txt) x (qkv, proj) + 2 single blocks x (linear1, linear2); MLPs add 2 x 4.
    assert "layers for 'attention': 12" in text
    assert "layers for 'attention_mlp': 20" in text


def comfy_denoised(patcher, noisy, sigma, context, pooled, guidance):
    """x0 as ComfyUI's own sampling computes it: conditioning in ComfyUI's format ([[context, {pooled_output,
    guidance}]]) through comfy.sample.sample_custom (what SamplerCustom runs), with a one-call sampler that
    evaluates the model once at (noisy, sigma) and records what it returns."""
    import comfy.sample
    import comfy.samplers
    seen = {}

    def one_call(model, x, sigmas, extra_args=None, callback=None, disable=None):
        seen["x0"] = model(noisy, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        return x
    positive = [[context, {"pooled_output": pooled, "guidance": guidance}]]
    with torch.inference_mode():
        comfy.sample.sample_custom(patcher, torch.zeros_like(noisy), 1.0, comfy.samplers.KSAMPLER(one_call),
                                   torch.tensor([sigma, 0.0]), positive, positive, torch.zeros_like(noisy))
    return seen["x0"].float()


def test_flow_prediction_is_the_raw_velocity(comfy, hunyuan_file, pack):
    """The pack's prediction is the flow velocity v with ComfyUI's x0 = x - sigma * v, x0 taken from
    ComfyUI's sampling path (not built with the pack's own helpers), for the same conditioning."""
    comfy_model = importlib.import_module(pack.__name__ + ".nodes.comfy_model")
    protocol = importlib.import_module(pack.__name__ + ".training.protocol")
    patcher = load_unet(comfy, hunyuan_file.name)
    view = comfy_model.ComfyDenoisingModel(patcher)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 1, 8, 8, generator=g)
    context, pooled = torch.randn(1, 5, 768, generator=g), torch.randn(1, 768, generator=g)
    with torch.inference_mode():
        velocity = view.predict(noisy, torch.tensor([0.6]), protocol.Conditioning(context, pooled, {"guidance": 1.0}))
    x0 = comfy_denoised(patcher, noisy, 0.6, context, pooled, 1.0)
    assert velocity.shape == noisy.shape and velocity.abs().mean() > 0
    torch.testing.assert_close(noisy - 0.6 * velocity, x0, rtol=1e-5, atol=1e-5)
    # The comparison sees the conditioning: other guidance or pooled vectors move ComfyUI's x0 well past it.
    for other in (comfy_denoised(patcher, noisy, 0.6, context, pooled, 4.0),
                  comfy_denoised(patcher, noisy, 0.6, context, -pooled, 1.0)):
        assert (other - x0).abs().max() > 1e-3
