"""Trainable adapters (peft layers) attached to a model's linear layers, and detached without a trace.

peft builds the layers (LoRA, DoRA, rsLoRA, LoHa, LoKr and their initialisations); Dojo only decides
where they go and guarantees the undo: `AttachedAdapter.detach()` puts every original module object back
into its parent, so a shared model (ComfyUI caches and shares MODEL objects) ends exactly as it began.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn

ADAPTER_NAME = "dojo"


class AdapterType(str, enum.Enum):
    LORA = "lora"
    DORA = "dora"
    LOHA = "loha"
    LOKR = "lokr"


@dataclass(frozen=True)
class AdapterConfig:
    kind: AdapterType = AdapterType.LORA
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1 (got {self.rank})")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive (got {self.alpha})")

    def peft_config(self, target_names: list[str]):
        import peft
        kind = AdapterType(self.kind)
        if kind in (AdapterType.LORA, AdapterType.DORA):
            return peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                   use_rslora=self.rslora, use_dora=kind is AdapterType.DORA,
                                   target_modules=target_names, init_lora_weights=True)
        if kind is AdapterType.LOHA:
            return peft.LoHaConfig(r=self.rank, alpha=self.alpha, module_dropout=self.dropout,
                                   target_modules=target_names, init_weights=True)
        return peft.LoKrConfig(r=self.rank, alpha=self.alpha, module_dropout=self.dropout,
                               target_modules=target_names, init_weights=True)


class AttachedAdapter:
    """The adapter layers living inside `root` until `detach()`."""

    def __init__(self, root: nn.Module, originals: dict[str, nn.Module], config: AdapterConfig,
                 requires_grad: dict[nn.Parameter, bool]):
        self.root = root
        self.originals = originals
        self.config = config
        self._requires_grad = requires_grad

    def layers(self) -> dict[str, nn.Module]:
        return {name: self.root.get_submodule(name) for name in self.originals}

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Adapter parameters as (module name + '.' + peft parameter name), in a stable order."""
        out = []
        for name, layer in self.layers().items():
            for pname, p in layer.named_parameters():
                if ADAPTER_NAME in pname.split("."):
                    out.append((f"{name}.{pname}", p))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise ValueError(f"adapter state does not fit: {len(missing)} missing keys (e.g. {sorted(missing)[:2]}), "
                             f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Per adapted module, the dense weight change [out, in] the adapter applies at strength 1."""
        return {name: layer.get_delta_weight(ADAPTER_NAME).detach().float()
                for name, layer in self.layers().items()}

    def low_rank_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module (down [r, in], up [out, r]) with the scale alpha/r baked into up: the form every
        LoRA loader reads the same way, with no alpha key needed."""
        if AdapterType(self.config.kind) is not AdapterType.LORA:
            raise NotImplementedError(f"{self.config.kind} adapters have no plain low-rank factors")
        factors = {}
        for name, layer in self.layers().items():
            down = layer.lora_A[ADAPTER_NAME].weight.detach().float()
            up = layer.lora_B[ADAPTER_NAME].weight.detach().float() * layer.scaling[ADAPTER_NAME]
            factors[name] = (down.clone(), up.clone())
        return factors

    def effective_delta(self, name: str) -> torch.Tensor:
        """The exact change [out, in] the adapter makes to module `name`'s weight (biases are never
        changed by these adapters). DoRA rescales each output row of W + s*B@A to its learned
        magnitude, so its change depends on the base weight."""
        layer = self.root.get_submodule(name)
        if AdapterType(self.config.kind) is not AdapterType.DORA:
            return layer.get_delta_weight(ADAPTER_NAME).detach().double()
        base = layer.get_base_layer().weight.detach().double()
        moved = base + layer.get_delta_weight(ADAPTER_NAME).detach().double()
        magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight.detach().double()
        return (magnitude / torch.linalg.norm(moved, dim=1))[:, None] * moved - base

    def export_factors(self, rtol: float = 1e-7) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(down, up) pairs for a plain LoRA file, which every loader reads.

        LoRA exports its own factors. DoRA, LoHa and LoKr export their exact weight change as a plain
        LoRA by SVD at the change's numerical rank (LoHa of rank r changes at most r^2 directions; DoRA
        can change all of them, so its file may be larger than the adapter)."""
        if AdapterType(self.config.kind) is AdapterType.LORA:
            return self.low_rank_factors()
        factors = {}
        for name in self.originals:
            u, s, vh = torch.linalg.svd(self.effective_delta(name), full_matrices=False)
            rank = max(1, int((s > s[0] * rtol).sum())) if s.numel() and s[0] > 0 else 1
            factors[name] = (vh[:rank].float().contiguous(), (u[:, :rank] * s[:rank]).float().contiguous())
        return factors

    def load_low_rank_factors(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Start from an existing LoRA: `factors` maps module name -> (down [r, in], up [out, r]) with the
        scale baked into up, as `low_rank_factors` gives them. Modules it does not name keep their fresh
        (zero-effect) initialisation."""
        if AdapterType(self.config.kind) is not AdapterType.LORA:
            raise ValueError(f"only a plain LoRA can continue from a LoRA file, not {self.config.kind}")
        layers = self.layers()
        unknown = sorted(set(factors) - set(layers))
        if unknown:
            raise ValueError(f"the LoRA has {len(unknown)} layers outside the chosen targets (e.g. {unknown[:2]}); "
                             "choose the targets it was trained with")
        with torch.no_grad():
            for name, (down, up) in factors.items():
                layer = layers[name]
                a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
                if tuple(down.shape) != tuple(a.shape) or tuple(up.shape) != tuple(b.shape):
                    theirs, ours = tuple(up.shape[:1]) + tuple(down.shape[1:]), tuple(b.shape[:1]) + tuple(a.shape[1:])
                    if down.shape[0] != a.shape[0]:
                        raise ValueError(f"the LoRA's layer {name} has rank {down.shape[0]} but training uses rank "
                                         f"{a.shape[0]}: set rank to {down.shape[0]}")
                    raise ValueError(f"the LoRA's layer {name} is {theirs} (out x in) but this model's layer is "
                                     f"{ours}: the LoRA was trained on another size of this model family (the rank, "
                                     f"{a.shape[0]}, already matches); load the base model it was trained on")
                a.copy_(down)
                b.copy_(up / layer.scaling[ADAPTER_NAME])

    def let_autocast_cast_inputs(self, enabled: bool) -> None:
        """Under autocast, stop peft's LoRA layers from casting each input to the fp32 adapter dtype
        (autocast casts it straight back to bf16 for the matmul: two full-size copies per layer and
        step, forward and backward). The values are the same either way (bf16 -> fp32 -> bf16 is
        exact), so the result is bit-identical; only the copies go. peft's own switch
        (`cast_input_dtype_enabled`, see peft.helpers.disable_input_dtype_casting) is used, on plain
        LoRA layers only. Without autocast the casts are needed (bf16 base, fp32 adapter)."""
        if AdapterType(self.config.kind) is not AdapterType.LORA:
            return
        for layer in self.layers().values():
            if hasattr(layer, "cast_input_dtype_enabled"):
                layer.cast_input_dtype_enabled = not enabled

    def detach(self) -> None:
        """Put every original module back; safe to call twice."""
        for name, original in self.originals.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.root.get_submodule(parent_name) if parent_name else self.root
            setattr(parent, child, original)
        self.originals = {}
        # peft marks every base parameter frozen; give each back the flag it had.
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)
        self._requires_grad = {}
        # peft records its config on the root module; a model that had none gets none back.
        if getattr(self, "_drop_peft_config", False):
            vars(self.root).pop("peft_config", None)
            self._drop_peft_config = False


def attach_adapter(root: nn.Module, modules: dict[str, nn.Module], config: AdapterConfig,
                   seed: int = 0) -> AttachedAdapter:
    """Wrap `modules` (names relative to `root`) in peft adapter layers with fp32 master weights.

    Initialisation draws from a generator seeded by `seed` (inside fork_rng, so the caller's global RNG
    stream is untouched): the same seed gives the same adapter bits.
    """
    import peft
    if not modules:
        raise ValueError("no layers to adapt: the target preset selected nothing in this model")
    originals = {name: root.get_submodule(name) for name in modules}
    requires_grad = {p: p.requires_grad for p in root.parameters()}
    attached = AttachedAdapter(root, originals, config, requires_grad)
    attached._drop_peft_config = "peft_config" not in vars(root)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft.inject_adapter_in_model(config.peft_config(list(originals)), root, adapter_name=ADAPTER_NAME)
        wrapped = [n for n, layer in attached.layers().items() if layer is originals[n]]
        if wrapped:
            raise RuntimeError(f"peft did not wrap {len(wrapped)} layers, e.g. {wrapped[:3]}")
        for p in attached.parameters():
            p.data = p.data.float()  # fp32 master weights whatever the base dtype
            p.requires_grad_(True)
    except BaseException:
        attached.detach()
        raise
    return attached
