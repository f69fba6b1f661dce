"""Adapters attach as peft layers and detach without a trace."""
import pytest
import torch

from comfyui_dojo.training.adapters import AdapterConfig, AdapterType, attach_adapter
from comfyui_dojo.training.protocol import Conditioning, TargetPreset

from helpers import tiny_unet_model


def _forward(model):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = Conditioning(torch.randn(1, 5, 32, generator=g))
    with torch.no_grad():
        return model.predict(x, torch.tensor([0.5]), cond)


def test_detach_restores_modules_flags_and_outputs_exactly():
    model = tiny_unet_model()
    before_modules = dict(model.unet.named_modules())
    flags = {n: p.requires_grad for n, p in model.unet.named_parameters()}
    attributes = set(vars(model.unet))
    before = _forward(model)
    adapter = attach_adapter(model.unet, model.adaptable_modules(TargetPreset.ATTENTION), AdapterConfig(rank=4))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1)  # a trained adapter changes the output...
    assert not torch.equal(_forward(model), before)
    adapter.detach()
    # ...and after detach every module object, flag and output bit is as before.
    assert dict(model.unet.named_modules()) == before_modules
    assert {n: p.requires_grad for n, p in model.unet.named_parameters()} == flags
    assert set(vars(model.unet)) == attributes  # no peft_config left behind
    assert torch.equal(_forward(model), before)


def test_fresh_lora_is_a_no_op_and_trains_only_its_own_parameters():
    model = tiny_unet_model()
    before = _forward(model)
    targets = model.adaptable_modules(TargetPreset.ATTENTION)
    adapter = attach_adapter(model.unet, targets, AdapterConfig(rank=4))
    assert torch.equal(_forward(model), before)  # lora_B starts at zero
    names = [n for n, _ in adapter.named_parameters()]
    assert len(names) == 2 * len(targets) and all(".dojo" in n for n in names)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in adapter.parameters())
    trainable = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(names)
    adapter.detach()


def test_same_seed_same_init_and_global_rng_untouched():
    states = []
    for _ in range(2):
        model = tiny_unet_model()
        rng_before = torch.random.get_rng_state()
        adapter = attach_adapter(model.unet, model.adaptable_modules(TargetPreset.ATTENTION), AdapterConfig(rank=4), seed=9)
        assert torch.equal(torch.random.get_rng_state(), rng_before)
        states.append(adapter.state_dict())
        adapter.detach()
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_low_rank_factors_bake_alpha_into_up():
    model = tiny_unet_model()
    adapter = attach_adapter(model.unet, model.adaptable_modules(TargetPreset.ATTENTION),
                             AdapterConfig(rank=4, alpha=2.0))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    deltas = adapter.delta_weights()
    for name, (down, up) in adapter.low_rank_factors().items():
        assert down.shape[0] == 4 and up.shape[1] == 4
        torch.testing.assert_close(up @ down, deltas[name])
    adapter.detach()


@pytest.mark.parametrize("kind", [AdapterType.DORA, AdapterType.LOHA, AdapterType.LOKR])
def test_other_peft_adapters_attach_and_receive_gradients(kind):
    model = tiny_unet_model()
    adapter = attach_adapter(model.unet, model.adaptable_modules(TargetPreset.ATTENTION), AdapterConfig(kind, rank=4))
    g = torch.Generator().manual_seed(0)
    out = model.predict(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([0.5]),
                        Conditioning(torch.randn(1, 5, 32, generator=g)))
    out.pow(2).mean().backward()
    grads = [p.grad for p in adapter.parameters()]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
    adapter.detach()


def test_bad_adapter_settings_are_refused():
    with pytest.raises(ValueError, match="rank"):
        AdapterConfig(rank=0)
    model = tiny_unet_model()
    with pytest.raises(ValueError, match="no layers"):
        attach_adapter(model.unet, {}, AdapterConfig())


@pytest.mark.parametrize("kind", list(AdapterType))
def test_exported_factors_reproduce_the_adapted_output(kind):
    """A plain LoRA made of the exported factors gives the same layer outputs as the live adapter."""
    model = tiny_unet_model()
    targets = model.adaptable_modules(TargetPreset.ATTENTION)
    adapter = attach_adapter(model.unet, targets, AdapterConfig(kind, rank=2, alpha=2.0), seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    factors = adapter.export_factors()
    x = torch.randn(3, next(iter(targets.values())).in_features, generator=g)
    checked = 0
    for name, layer in adapter.layers().items():
        down, up = factors[name]
        base = layer.get_base_layer()
        if base.in_features != x.shape[1]:
            continue
        with torch.no_grad():
            expected = layer(x)
            exported = base(x) + x @ down.T @ up.T
        torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked >= 8
    if kind is AdapterType.LOHA:  # the Hadamard product of two rank-2 factors spans at most 4 directions
        assert max(down.shape[0] for down, _ in factors.values()) <= 4
    adapter.detach()


def test_autocast_input_casts_can_go_without_changing_a_bit():
    """Under bf16 autocast peft casts each LoRA input to fp32 and autocast casts it back; skipping that
    round trip (exact in value) must leave outputs and gradients bit-identical."""
    results = []
    for skip in (False, True):
        model = tiny_unet_model()
        adapter = attach_adapter(model.unet, model.adaptable_modules(TargetPreset.ATTENTION_MLP),
                                 AdapterConfig(rank=4, alpha=4), seed=3)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        adapter.let_autocast_cast_inputs(skip)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(2, 4, 8, 8, generator=g)
        cond = Conditioning(torch.randn(2, 5, 32, generator=g))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.predict(x, torch.tensor([0.3, 0.7]), cond)
        out.float().pow(2).mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in adapter.parameters()]))
        adapter.detach()
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert len(grads_a) > 4 and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert any(a.abs().max() > 0 for a in grads_a)
