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


def test_flow_prediction_is_the_raw_velocity(comfy, hunyuan_file, pack):
    comfy_model = importlib.import_module(pack.__name__ + ".nodes.comfy_model")
    protocol = importlib.import_module(pack.__name__ + ".training.protocol")
    patcher = load_unet(comfy, hunyuan_file.name)
    view = comfy_model.ComfyDenoisingModel(patcher)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 1, 8, 8, generator=g)
    t = torch.tensor([0.6])
    cond = protocol.Conditioning(torch.randn(1, 5, 768, generator=g), torch.randn(1, 768, generator=g),
                                 {"guidance": 1.0})
    with torch.inference_mode():
        velocity = view.predict(noisy, t, cond)
        # ComfyUI's own apply_model returns x0 = x - sigma * v for flow models.
        kwargs = importlib.import_module(pack.__name__ + ".nodes.comfy_compat").model_kwargs(
            patcher.model, noisy, cond.context, cond.pooled, cond.extra)
        x0 = patcher.model.apply_model(noisy, t, **kwargs)
    assert velocity.shape == noisy.shape
    assert velocity.abs().mean() > 0
    torch.testing.assert_close(noisy - 0.6 * velocity, x0, rtol=1e-5, atol=1e-5)
