"""Generic mode's spec from a network alone (training/families/generic.py): block lists by module type,
attention / MLP / other linears, exact target patterns, and the refusal of a network with nothing to adapt."""
import pytest
from torch import nn

from comfyui_dojo.training.families import COMFY_GENERIC
from comfyui_dojo.training.families import generic
from comfyui_dojo.training.protocol import Family, TargetPreset, select_linears

FACTS = generic.ComfyModelFacts(config_name="Toy", model_class="ToyModel", network_class="ToyNet", latent_channels=4)


class SelfAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = SelfAttention(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.modulation = nn.Linear(d, 2 * d)


class Stage(nn.Sequential):
    """A UNet-style container whose layers the network calls one by one (never the container)."""


class ToyNet(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(3)])
        self.heads = nn.ModuleList([nn.Linear(d, d) for _ in range(2)])        # linears, not blocks
        self.stages = nn.ModuleList([Stage(nn.Conv2d(d, d, 1), nn.ModuleList([Block(d)])) for _ in range(2)])
        self.out = nn.Linear(d, 4)


def test_block_lists_are_found_by_type_outermost_and_called_ones_only():
    net = ToyNet()
    # `blocks` (repeated Blocks); inside the Sequential stages the inner lists of Blocks, not the stages.
    assert generic.find_block_lists(net) == ("blocks", "stages.0.1", "stages.1.1")
    assert len(generic.blocks_of(net, generic.find_block_lists(net))) == 5


def test_linears_are_sorted_and_presets_select_exactly_them():
    net = ToyNet()
    spec = generic.build_spec(net, FACTS)
    assert spec.family is Family.GENERIC and spec.generic and spec.writes_in_place
    assert spec.lora_layout is COMFY_GENERIC and spec.comfy_configs == ("Toy",)
    kinds = generic.block_linears(net, spec.block_lists)
    assert kinds["blocks.0.attn.qkv"] == "attention" and kinds["blocks.2.ff.2"] == "mlp"
    assert kinds["stages.1.1.0.modulation"] == "other"

    def chosen(preset):
        return set(select_linears(net, spec.targets[preset]))

    assert chosen(TargetPreset.ATTENTION) == {n for n, k in kinds.items() if k == "attention"}
    assert chosen(TargetPreset.ATTENTION_MLP) == {n for n, k in kinds.items() if k in ("attention", "mlp")}
    assert chosen(TargetPreset.ALL_LINEAR) == set(kinds)
    assert not chosen(TargetPreset.ALL_LINEAR) & {"embed", "out", "heads.0", "heads.1"}
    assert len(kinds) == 5 * 5  # qkv, proj, ff.0, ff.2, modulation per block


def test_presets_without_their_kind_take_every_block_linear():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1, self.linear2 = nn.Linear(4, 4), nn.Linear(4, 4)

    net = nn.Module()
    net.layers = nn.ModuleList([Plain(), Plain()])
    spec = generic.build_spec(net, FACTS)
    every = set(select_linears(net, spec.targets[TargetPreset.ALL_LINEAR]))
    assert len(every) == 4
    assert all(set(select_linears(net, spec.targets[p])) == every for p in TargetPreset)


def test_a_network_without_linears_in_blocks_is_refused_naming_it():
    net = nn.Module()
    net.proj = nn.Linear(4, 4)
    net.convs = nn.ModuleList([nn.Conv2d(4, 4, 3) for _ in range(2)])
    with pytest.raises(generic.GenericModelError, match=r"'Toy'.*ToyModel.*ToyNet.*no linear layers"):
        generic.build_spec(net, FACTS)


def test_backward_failures_name_the_model_and_other_errors_pass():
    with pytest.raises(generic.GenericModelError, match="'Toy'.*cannot run backward"):
        with generic.backward_failures_named(FACTS):
            raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with generic.backward_failures_named(FACTS):
            raise RuntimeError("shape mismatch")
