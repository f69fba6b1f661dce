"""Gradient protection against in-place ops on saved tensors, on a toy block shaped like Flux's."""
import pytest
import torch
from torch import nn

from comfyui_dojo.training.grad_safety import (UnsafeInplaceError, checkpoint_blocks, clone_all_saved_tensors,
                                                copy_on_write_saved_tensors, protected_training)


class ResidualBlock(nn.Module):
    """Pre-norm residual block that adds its residuals in place, like ComfyUI's DoubleStreamBlock."""

    def __init__(self, dim, out_of_place=False):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.out_of_place = out_of_place

    def forward(self, x, scale):
        h = self.fc1(self.norm(x)) * scale
        x = x + h if self.out_of_place else x.__iadd__(h)
        h = self.fc2(torch.tanh(self.norm(x)))
        if self.out_of_place:
            x = x + h
        else:
            x += h
        return x


class Toy(nn.Module):
    def __init__(self, dim=8, depth=3, out_of_place=False):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(ResidualBlock(dim, out_of_place) for _ in range(depth))
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        x = self.inp(x)
        scale = torch.ones((), dtype=x.dtype) * 0.5
        for block in self.blocks:
            x = block(x, scale=scale)
        return self.out(x)


def make_pair(dtype=torch.float64):
    torch.manual_seed(0)
    model = Toy().to(dtype)
    reference = Toy(out_of_place=True).to(dtype)
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        m.inp.requires_grad_(False)  # like a frozen base: only the blocks' weights train
    x = torch.randn(4, 5, 8, dtype=dtype)
    return model, reference, x


def grads(model, x):
    model.zero_grad(set_to_none=True)
    loss = (model(x) ** 2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_protected_gradients_equal_out_of_place_reference(checkpointing):
    model, reference, x = make_pair()
    expected = grads(reference, x)
    with protected_training(model.blocks, checkpointing=checkpointing) as stats:
        got = grads(model, x)
    assert_grads_equal(got, expected)
    if not checkpointing:
        # Only the overwritten residual streams were copied, not every saved tensor.
        assert 0 < stats.copies < stats.saved


def test_backward_may_run_after_the_region():
    model, reference, x = make_pair()
    expected = grads(reference, x)
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        with protected_training(model.blocks, checkpointing=checkpointing):
            loss = (model(x) ** 2).mean()
        loss.backward()
        assert_grads_equal({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, expected)


def test_clone_all_reference_agrees():
    model, reference, x = make_pair()
    with clone_all_saved_tensors():
        got = grads(model, x)
    assert_grads_equal(got, grads(reference, x))


def test_unprotected_backward_raises():
    model, _, x = make_pair()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grads(model, x)


@pytest.mark.parametrize("stream_requires_grad", [False, True], ids=["frozen_input", "trained_input"])
def test_unprotected_torch_checkpoint_still_raises(stream_requires_grad):
    """torch's own (non-reentrant) checkpoint around each block does not make the in-place residual adds
    safe: backward still finds a saved stream overwritten, whether or not the stream entering the blocks
    requires grad (what protected_training(checkpointing=True) fixes, above)."""
    model, _, x = make_pair()
    model.inp.requires_grad_(stream_requires_grad)
    recomputed = []
    for block in model.blocks:
        forward = block.forward

        def run(*a, _f=forward, **k):
            recomputed.append(torch.is_grad_enabled())
            return _f(*a, **k)
        block.forward = lambda *a, _run=run, **k: torch.utils.checkpoint.checkpoint(_run, *a, use_reentrant=False, **k)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grads(model, x)
    assert len(recomputed) >= len(model.blocks)  # the checkpoint was in place: each block ran through it


def test_uninterceptable_overwrite_raises_instead_of_a_wrong_gradient():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y = torch.tanh(self.fc(x))  # tanh saves its output
            with torch._C.DisableTorchFunction():  # invisible to the protection
                y.mul_(2.0)
            return y

    for checkpointing in (False, True):
        m = Sneaky().double()
        with protected_training([m], checkpointing=checkpointing):
            loss = m(torch.randn(3, 8, dtype=torch.float64)).sum()
        with pytest.raises(UnsafeInplaceError, match="overwritten in place"):
            loss.backward()


def test_nothing_stays_installed():
    model, _, x = make_pair()
    with torch.no_grad():
        before = model(x)
    for checkpointing in (False, True):
        with pytest.raises(ValueError):
            with protected_training(model.blocks, checkpointing=checkpointing):
                assert all("forward" in vars(b) for b in model.blocks) == checkpointing
                raise ValueError("boom")
        assert not any("forward" in vars(b) for b in model.blocks)
        assert not torch.overrides._get_current_function_mode_stack()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_substitutions_apply_inside_the_region_only():
    calls = []

    def my_tanh(x):
        calls.append(1)
        return torch.sigmoid(x)

    x = torch.randn(3)
    with copy_on_write_saved_tensors({torch.tanh: my_tanh}):
        torch.testing.assert_close(torch.tanh(x), torch.sigmoid(x))
    torch.testing.assert_close(torch.tanh(x), x.tanh())
    assert calls == [1]


def test_checkpoint_refuses_to_stack():
    block = ResidualBlock(4)
    with checkpoint_blocks([block]):
        with pytest.raises(RuntimeError, match="already has"):
            with checkpoint_blocks([block]):
                pass
    assert "forward" not in vars(block)


def test_checkpointed_blocks_train_when_no_input_requires_grad():
    torch.manual_seed(0)
    block = ResidualBlock(8).double()
    ref = ResidualBlock(8, out_of_place=True).double()
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 8, dtype=torch.float64)
    with protected_training([block], checkpointing=True):
        block(x.clone(), 1.0).sum().backward()
    ref(x, 1.0).sum().backward()
    torch.testing.assert_close(block.fc1.weight.grad, ref.fc1.weight.grad)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_unprotected_checkpointing_of_out_of_place_blocks_is_exact(checkpointing):
    """protect=False (what a UNet gets): checkpointing alone, no per-op protection, exact gradients."""
    model, reference, x = make_pair()
    torch.manual_seed(1)
    plain = Toy(out_of_place=True).double()
    plain.load_state_dict(model.state_dict())
    plain.inp.requires_grad_(False)
    with protected_training(plain.blocks, checkpointing=checkpointing, protect=False) as stats:
        got = grads(plain, x)
    assert stats is None
    assert_grads_equal(got, grads(reference, x))


def test_unprotected_checkpointing_of_in_place_blocks_raises_instead_of_a_wrong_gradient():
    model, _, x = make_pair()
    with pytest.raises(RuntimeError, match="inplace|in-place"):
        with protected_training(model.blocks, checkpointing=True, protect=False):
            grads(model, x)


def test_blocks_no_gradient_flows_through_are_not_recomputed():
    """A block whose inputs and weights all are frozen saves nothing for backward: it runs once; the
    blocks after it (trainable) run twice, and the gradients stay exact."""
    model, reference, x = make_pair()
    for m in (model, reference):
        m.blocks[0].requires_grad_(False)
    calls = []
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    try:
        with protected_training(model.blocks, checkpointing=True):
            got = grads(model, x)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(calls) == [0, 1, 1, 2, 2]
    assert_grads_equal(got, grads(reference, x))


class DirectReadBlock(ResidualBlock):
    """Reads its stream with an op of its own (not a submodule) that saves it, then writes it in place:
    outside what the "streams" protection assumes."""

    def forward(self, x, scale):
        h = self.fc1(x * x) * scale  # mul saves x itself
        x += h
        return x


@pytest.mark.parametrize("checkpointing", [False, True])
def test_stream_protection_gradients_equal_out_of_place_reference(checkpointing):
    model, reference, x = make_pair()
    expected = grads(reference, x)
    with protected_training(model.blocks, checkpointing=checkpointing, protect="streams") as stats:
        got = grads(model, x)
    assert_grads_equal(got, expected)
    assert stats.copies > 0
    for block in model.blocks:  # nothing stays installed
        assert not block._forward_pre_hooks and not block._forward_hooks
        assert all(not child._forward_pre_hooks for child in block.children())
        assert "forward" not in vars(block)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_stream_protection_refuses_what_it_does_not_cover(checkpointing):
    """A write the stream protection cannot prevent is autograd's error, never a wrong gradient;
    copy-on-write handles the same block exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(DirectReadBlock(8)).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)

    def run(protect):
        model.zero_grad(set_to_none=True)
        with protected_training(list(model), checkpointing=checkpointing, protect=protect):
            (model[0](x.clone(), 0.5) ** 2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        run("streams")
    exact = run("copy_on_write")
    ref_model = nn.Linear(8, 8).double()
    ref_model.load_state_dict(model[0].fc1.state_dict())
    xx = x.detach()
    h = ref_model(xx * xx) * 0.5
    ((xx + h) ** 2).mean().backward()
    torch.testing.assert_close(exact["0.fc1.weight"], ref_model.weight.grad, rtol=1e-10, atol=1e-12)
