"""Issue 11: correct LoRA gradients through ComfyUI's own Flux / HunyuanVideo blocks, which add
residuals in place on tensors autograd saved.

Reference: the same forward with every tensor autograd saves copied at the moment it is saved
(`clone_all_saved_tensors`). A saved value then cannot be changed by any later write, so backward sees
exactly what an out-of-place version of the block would have saved: the true gradient of the
computation, whatever the model code does in place, and without copying (or editing) ComfyUI's block
code. It costs a copy of every activation, which is why it is only the reference. The engine tests
check this reference against a hand-written out-of-place block.
"""
import contextlib
import importlib
import sys

import pytest
import torch
import torch.utils.checkpoint

from tiny_comfy_models import build_tiny_flux, build_tiny_hunyuan_video_net, tiny_inputs

pytestmark = pytest.mark.integration

FAMILIES = ("flux", "hunyuan_video")
TOLERANCE = 1e-5  # max |g - g_ref| / max |g_ref| per parameter
LORA_TARGETS = ("img_in", "img_attn.qkv", "txt_attn.proj", "img_mlp.2", "linear1", "linear2")


@pytest.fixture(scope="module")
def pack(comfy):
    name = comfy.pack_module_name()
    return {
        "protection": importlib.import_module(name + ".nodes.grad_protection"),
        "compat": importlib.import_module(name + ".nodes.comfy_compat"),
        "safety": importlib.import_module(name + ".training.grad_safety"),
    }


class Lora:
    """Trainable deltas x @ A @ B added to a few Linear outputs through forward hooks."""

    def __init__(self, net, seed=0, rank=2, targets=LORA_TARGETS, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.params, self.handles = {}, []
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(targets):
                a = (torch.randn(module.in_features, rank, generator=g) * 0.2).to(dtype).requires_grad_()
                b = (torch.randn(rank, module.out_features, generator=g) * 0.2).to(dtype).requires_grad_()
                self.params[name + ".A"], self.params[name + ".B"] = a, b
                self.handles.append(module.register_forward_hook(
                    lambda m, inp, out, a=a, b=b: out + (inp[0] @ a) @ b))

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, comfy):
    net = build_tiny_flux() if request.param == "flux" else build_tiny_hunyuan_video_net()
    lora = Lora(net)
    yield request.param, net, lora
    lora.remove()


def lora_grads(net, lora, family, context):
    for p in lora.params.values():
        p.grad = None
    args, kwargs = tiny_inputs(family)
    with torch.inference_mode(False), torch.enable_grad(), context:
        loss = (net(*args, **kwargs) ** 2).mean()
        loss.backward()
    return {k: p.grad.clone() for k, p in lora.params.items()}


def relative_errors(got, ref):
    return {k: ((got[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref}


@pytest.fixture(scope="module")
def reference(setup, pack):
    family, net, lora = setup
    ref = lora_grads(net, lora, family, pack["safety"].clone_all_saved_tensors(pack["compat"].rope_substitutions()))
    assert len(ref) >= 12 and all(g.abs().max() > 0 for g in ref.values())
    return ref


def test_reference_equals_out_of_place_blocks(setup, pack, reference):
    """Cross-check of the reference: make `+=` out of place (Tensor.__iadd__ patched for this test
    only, which turns ComfyUI's residual adds into `x = x + ...`) and compare."""
    family, net, lora = setup
    torch.Tensor.__iadd__ = lambda self, other: self + other
    try:
        out_of_place = lora_grads(net, lora, family, pack["safety"].op_substitutions(pack["compat"].rope_substitutions()))
    finally:
        del torch.Tensor.__iadd__
    errors = relative_errors(out_of_place, reference)
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize("protect", ["copy_on_write", "streams"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_protected_gradients_match_reference(setup, pack, reference, checkpointing, protect):
    """Both protections give the reference's gradients on ComfyUI's own blocks: copy-on-write of saved
    tensors (any model) and the family's cheap one, copies of the block inputs its submodules read."""
    family, net, lora = setup
    with pack["protection"].protected_comfy_training(net, checkpointing, protect=protect) as stats:
        got = lora_grads(net, lora, family, contextlib.nullcontext())
    errors = relative_errors(got, reference)
    assert max(errors.values()) < TOLERANCE, errors
    if protect == "streams" or not checkpointing:  # (copy-on-write counts recomputation copies apart)
        assert stats.copies > 0  # the residual streams were really copied for their readers


def test_unprotected_backward_raises(setup, pack):
    family, net, lora = setup
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lora_grads(net, lora, family, pack["safety"].op_substitutions(pack["compat"].rope_substitutions()))


def _builtin_trainer_checkpointing(blocks, substitute):
    """What ComfyUI's built-in trainer does: non-reentrant torch checkpoint around each block, with
    only the RoPE fixed (inside the checkpointed function, so that the recomputation uses it too)."""
    def run(fwd, args, kwargs):
        with substitute():
            return fwd(*args, **kwargs)

    for block in blocks:
        fwd = type(block).forward.__get__(block)
        block.forward = lambda *args, _fwd=fwd, **kwargs: torch.utils.checkpoint.checkpoint(
            run, _fwd, args, kwargs, use_reentrant=False)


# What the built-in trainer's setup does to each family, measured (the same for every seed of the tiny
# models, DOJO_TEST_MODEL_SEED=0..5): "raises" when the residual streams do not require grad as they
# enter the first block (overwriting them changes what the recomputation saves, and torch notices);
# "wrong" when they do (Flux with deltas on img_in and txt_in): the recomputation silently starts from
# the overwritten inputs and only the comparison with the reference catches it.
UNPROTECTED_CHECKPOINTING = {
    ("flux", "streams_require_grad"): "wrong", ("flux", "blocks_only"): "raises",
    ("hunyuan_video", "streams_require_grad"): "raises", ("hunyuan_video", "blocks_only"): "raises",
}


@pytest.mark.parametrize("targets", [LORA_TARGETS + ("txt_in", "txt_in.input_embedder"), LORA_TARGETS[1:]],
                         ids=["streams_require_grad", "blocks_only"])
def test_unprotected_checkpointing_fails(setup, pack, targets):
    """The built-in trainer's setup (torch checkpoint, no protection) gives wrong gradients or raises,
    each where UNPROTECTED_CHECKPOINTING says."""
    family, net, _ = setup
    expected = UNPROTECTED_CHECKPOINTING[(family, "streams_require_grad" if "txt_in" in targets else "blocks_only")]
    lora = Lora(net, seed=7, targets=targets)
    subs = pack["compat"].rope_substitutions()
    blocks = pack["protection"].transformer_blocks(net)
    try:
        ref = lora_grads(net, lora, family, pack["safety"].clone_all_saved_tensors(subs))
        _builtin_trainer_checkpointing(blocks, lambda: pack["safety"].op_substitutions(subs))
        if expected == "raises":
            # torch's checkpoint sees the block overwrite its own inputs (it recomputes another graph)
            with pytest.raises(RuntimeError, match="checkpoint|inplace"):
                lora_grads(net, lora, family, pack["safety"].op_substitutions(subs))
        else:
            errors = relative_errors(lora_grads(net, lora, family, pack["safety"].op_substitutions(subs)), ref)
            print(f"unprotected checkpointing: max relative gradient error {max(errors.values()):.2e}")
            assert max(errors.values()) > 100 * TOLERANCE, errors
    finally:
        lora.remove()
        for block in blocks:
            vars(block).pop("forward", None)


def test_kitchen_rope_is_used_and_substituted(setup, pack):
    """comfy-kitchen's RoPE op (no autograd formula) runs on CPU too; the substitute matches it."""
    family, net, lora = setup
    subs = pack["compat"].rope_substitutions()
    assert subs, "comfy-kitchen is installed with ComfyUI, so its RoPE ops should be registered"
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, 5, 32, generator=g)
    angles = torch.randn(1, 1, 5, 16, generator=g)
    pe = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], -1).reshape(1, 1, 5, 16, 2, 2)
    ops = torch.ops.comfy_kitchen
    for got, want in zip(subs[ops.apply_rope](q, k, pe), ops.apply_rope(q, k, pe)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(subs[ops.apply_rope1](q, pe), ops.apply_rope1(q, pe))
    # Without the substitution, backward through ComfyUI's model fails as users saw.
    with pytest.raises(RuntimeError, match="no autograd formula"):
        lora_grads(net, lora, family, pack["safety"].clone_all_saved_tensors())


def _installed_state(blocks):
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return (any("forward" in vars(b) for b in blocks), bool(torch.overrides._get_current_function_mode_stack()),
            hooks is not None)


def test_outputs_bit_identical_after_training(setup, pack):
    family, net, lora = setup
    lora.remove()  # the base model's own outputs
    try:
        args, kwargs = tiny_inputs(family, seed=5)
        blocks = pack["protection"].transformer_blocks(net)
        with torch.inference_mode():
            before = net(*args, **kwargs)
        for checkpointing in (False, True):
            step_lora = Lora(net, seed=3)
            lora_grads(net, step_lora, family, pack["protection"].protected_comfy_training(net, checkpointing))
            step_lora.remove()
        assert _installed_state(blocks) == (False, False, False)
        with torch.inference_mode():
            after = net(*args, **kwargs)
        assert torch.equal(before, after)
    finally:
        relinked = Lora(net)  # restore the module's LoRA for later tests in this module
        lora.params, lora.handles = relinked.params, relinked.handles
