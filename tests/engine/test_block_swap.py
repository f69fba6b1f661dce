"""Block swap (training/block_swap.py) on a toy with ComfyUI-style in-place residual blocks.

This machine has no accelerator, so device and offload device are both the CPU; the swap still copies
every parked block's frozen weights for each forward (and each checkpoint recomputation), so what is
tested is that streamed copies give exactly the same gradients and that nothing is left behind."""
import pytest
import torch

from comfyui_dojo.training.block_swap import block_swap
from comfyui_dojo.training.grad_safety import protected_training

from test_grad_safety import Toy


def make_model():
    torch.manual_seed(0)
    model = Toy(depth=4).to(torch.float32)
    model.inp.requires_grad_(False)
    for block in model.blocks:
        block.fc1.requires_grad_(False)   # frozen base weights (streamed)...
        block.fc2.weight.requires_grad_(False)
        # ...and fc2.bias stays trainable, like an adapter parameter inside the block
    return model


def snapshot(model):
    return {n: (t, t.data_ptr(), t.device, t.clone()) for n, t in
            list(model.named_parameters()) + list(model.named_buffers())}


def train_steps(model, x, checkpointing, swap, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses, grads = [], []
    with protected_training(model.blocks, checkpointing=checkpointing), \
            (block_swap(model.blocks, "cpu", resident=1) if swap else _null()) as stats:
        for _ in range(steps):
            loss = (model(x) ** 2).mean()
            loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            opt.step()
            opt.zero_grad(set_to_none=True)
    return losses, grads, stats, {n: p.detach().clone() for n, p in model.named_parameters()}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_gives_identical_training_and_restores_everything(checkpointing):
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    plain = train_steps(make_model(), x, checkpointing, swap=False)
    model = make_model()
    before = snapshot(model)
    frozen_before = {n: v for n, v in before.items() if not v[0].requires_grad}
    losses, grads, stats, params = train_steps(model, x, checkpointing, swap=True)
    assert losses == plain[0]
    for got, want in zip(grads, plain[1]):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert all(torch.equal(params[k], plain[3][k]) for k in params)
    # 3 parked blocks streamed once per forward, and again for each checkpoint recomputation.
    assert stats.swapped_blocks == 3
    assert stats.loads == 3 * 3 * (2 if checkpointing else 1)
    # Same objects, same storage, same device, same values for every frozen tensor; no hook left.
    after = snapshot(model)
    for name, (t, ptr, device, value) in frozen_before.items():
        assert after[name][0] is t and after[name][1] == ptr and after[name][2] == device
        assert torch.equal(t, value)
    for block in model.blocks:
        assert not block._forward_pre_hooks and not block._forward_hooks
        assert "_dojo_swap_stack" not in vars(block) and "forward" not in vars(block)


def test_parked_blocks_run_on_copies_and_trainable_parameters_stay_put():
    model = make_model()
    seen = []

    def probe(block, args):  # registered after the swap's hook: sees what the block computes with
        seen.append((block.fc1.weight.data_ptr(), block.fc2.bias))

    originals = [(b.fc1.weight.data_ptr(), b.fc2.bias) for b in model.blocks]
    with block_swap(model.blocks, "cpu", resident=2):
        handles = [b.register_forward_pre_hook(probe) for b in model.blocks]
        model(torch.randn(1, 5, 8))
        for h in handles:
            h.remove()
    assert [s[0] == o[0] for s, o in zip(seen, originals)] == [True, True, False, False]
    assert all(s[1] is o[1] for s, o in zip(seen, originals))  # trainable: the optimizer's object
    assert [b.fc1.weight.data_ptr() for b in model.blocks] == [o[0] for o in originals]


def test_block_swap_restores_after_an_error_inside_a_block():
    model = make_model()
    before = snapshot(model)

    def boom(block, args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with block_swap(model.blocks, "cpu", resident=0):
            model.blocks[2].register_forward_pre_hook(boom)
            model(torch.randn(1, 5, 8))
    for name, (t, ptr, _, _) in before.items():
        assert dict(list(model.named_parameters()) + list(model.named_buffers()))[name] is t
    assert "_dojo_swap_stack" not in vars(model.blocks[0])


def test_resident_must_not_be_negative():
    with pytest.raises(ValueError):
        with block_swap(make_model().blocks, "cpu", resident=-1):
            pass
