"""The engine's model protocol over tiny diffusers models, and the noise-schedule maths."""
import pytest
import torch

from comfyui_dojo.training import tiny_models
from comfyui_dojo.training.diffusers_models import DiffusersFlux, DiffusersUNet, discrete_schedule
from comfyui_dojo.training.protocol import (Conditioning, DenoisingModel, Family, NoiseSchedule, Prediction,
                                            TargetPreset)


def test_discrete_schedule_adds_noise_in_variance_preserving_form():
    schedule = discrete_schedule(Prediction.EPSILON)
    x0, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    noisy = schedule.add_noise(x0, noise, torch.tensor([0.0, 1.0]))
    alpha, sigma = schedule.coefficients(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones(2))
    assert noisy[0].mean() > 0.99 and noisy[1].mean() < 0.1  # t=1 is almost pure noise
    assert schedule.timestep_index(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0, 500, 999]


@pytest.mark.parametrize("prediction", list(Prediction))
def test_targets_recover_the_clean_latent(prediction):
    """Each native target, with the noisy latent, determines x0: the identity samplers rely on."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    schedule = NoiseSchedule(prediction, shift=3.0) if prediction is Prediction.FLOW \
        else discrete_schedule(prediction)
    noisy, target = schedule.add_noise(x0, noise, t), schedule.target(x0, noise, t)
    alpha, sigma = (c.reshape(-1, 1, 1, 1) for c in schedule.coefficients(t))
    if prediction is Prediction.EPSILON:
        recovered = (noisy - sigma * target) / alpha
    elif prediction is Prediction.V:
        recovered = alpha * noisy - sigma * target
    else:
        recovered = noisy - sigma * target
    torch.testing.assert_close(recovered, x0, rtol=1e-4, atol=1e-4)


def test_discrete_schedule_requires_alphas():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule(Prediction.EPSILON)


def _sd_batch(b=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, 16, 16, generator=g), Conditioning(torch.randn(b, 7, 32, generator=g))


def test_unet_protocol_predicts_latent_shaped_output():
    model = DiffusersUNet(tiny_models.tiny_sd15_unet())
    assert isinstance(model, DenoisingModel)
    x, cond = _sd_batch()
    with torch.no_grad():
        out = model.predict(x, torch.tensor([0.2, 0.8]), cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sdxl_unet_uses_pooled_and_size_conditioning():
    model = DiffusersUNet(tiny_models.tiny_sdxl_unet(), Family.SDXL)
    x, cond = _sd_batch()
    cond.pooled = torch.randn(2, 32)
    cond.extra["time_ids"] = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
    with torch.no_grad():
        a = model.predict(x, torch.tensor([0.5, 0.5]), cond)
        cond.pooled = cond.pooled + 1
        b = model.predict(x, torch.tensor([0.5, 0.5]), cond)
    assert not torch.allclose(a, b)


def test_flux_protocol_round_trips_latent_layout():
    model = DiffusersFlux(tiny_models.tiny_flux_transformer())
    assert model.schedule.is_flow
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 8, 12, generator=g)
    cond = Conditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g))
    with torch.no_grad():
        out = model.predict(x, torch.tensor([0.5]), cond)
        # Changing one latent pixel must change the prediction mostly at that pixel's 2x2 patch.
        x2 = x.clone()
        x2[0, :, 5, 9] += 10
        delta = (model.predict(x2, torch.tensor([0.5]), cond) - out).abs().sum(1)[0]
    assert out.shape == x.shape
    assert delta[4:6, 8:10].sum() > delta.sum() * 0.2


@pytest.mark.parametrize("preset", list(TargetPreset))
def test_target_presets_select_nested_linear_sets(preset):
    unet = DiffusersUNet(tiny_models.tiny_sd15_unet())
    flux = DiffusersFlux(tiny_models.tiny_flux_transformer())
    for model in (unet, flux):
        selected = model.adaptable_modules(preset)
        assert selected and all(isinstance(m, torch.nn.Linear) for m in selected.values())
        assert set(model.adaptable_modules(TargetPreset.ATTENTION)) <= set(selected)
        assert set(selected) <= set(model.adaptable_modules(TargetPreset.ALL_LINEAR))
