"""MAD-X bottleneck adapters (Pfeiffer et al., EMNLP 2020; Houlsby et al., ICML 2019).

Placement follows AdapterHub's definitions so weights interoperate. With ``h`` the output of
a sub-layer's dense+dropout and ``x`` the sub-layer input (the residual stream):

* ``pfeiffer`` (after the FFN only):  h <- h + A(LN(h + x)), then the model computes LN(h + x);
* ``houlsby`` (after attention and FFN):  h <- h + A(h), then LN(h + x).

Several adapters at one site form a Stack (MAD-X: language adapter below the task adapter):
each transforms ``h`` in turn. Injection uses hooks only: a pre-hook on the sub-layer output
module captures ``x``; a forward hook on its dropout rewrites ``h``. No transformers class is edited.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from xlpeft.config import build, check_fields
from xlpeft.errors import XlpeftError
from xlpeft.methods.base import AppliedModule, MethodSpec, ModuleTrainable, Phase
from xlpeft.methods.bottleneck import ACTIVATIONS, Bottleneck
from xlpeft.methods.invertible import InvertibleAdapter
from xlpeft.models import ArchSpec, get_submodule

PLACEMENTS = {"pfeiffer": ("ffn",), "houlsby": ("attn", "ffn")}
PLACEMENT_ACTIVATIONS = {"pfeiffer": "relu", "houlsby": "swish"}
"""The default non-linearity per placement: AdapterHub 1.3.0's SeqBnConfig (relu) and DoubleSeqBnConfig (swish)."""


@dataclass(frozen=True)
class AdapterConfig:
    """Hyper-parameters of a bottleneck adapter module. Defaults are MAD-X language adapters."""

    placement: str = field(default="pfeiffer", metadata={"help": "pfeiffer (after FFN) or houlsby (after attention and FFN)", "choices": tuple(PLACEMENTS)})
    reduction_factor: float = field(default=2.0, metadata={"help": "hidden size / bottleneck width (MAD-X: 2 language, 16 task)", "gt": 0.0})
    non_linearity: str | None = field(default=None, metadata={
        "help": "bottleneck activation; None follows the placement as AdapterHub's presets do: relu for pfeiffer "
                "(SeqBnConfig, MAD-X), swish for houlsby (DoubleSeqBnConfig)", "choices": tuple(ACTIVATIONS)})
    invertible: bool = field(default=True, metadata={"help": "add a NICE invertible adapter on the embeddings (language modules)"})
    inv_reduction_factor: float = field(default=2.0, metadata={"help": "reduction factor of the invertible adapter's F and G", "gt": 0.0})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.non_linearity is None:  # resolved here, so manifests record the activation actually used
            object.__setattr__(self, "non_linearity", PLACEMENT_ACTIVATIONS[self.placement])

    @classmethod
    def defaults_for(cls, kind: str) -> dict:
        """MAD-X defaults per module kind: language adapters rf 2 + invertible; task adapters rf 16, none."""
        return {"reduction_factor": 16.0, "invertible": False} if kind == "task" else {}


class AdapterModule(nn.Module):
    """All adapter weights of one language or task module: per-layer bottlenecks + optional invertible adapter."""

    def __init__(self, config: AdapterConfig, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.config = config
        sites = PLACEMENTS[config.placement]
        self.layers = nn.ModuleList(
            nn.ModuleDict({s: Bottleneck(hidden_size, config.reduction_factor, config.non_linearity) for s in sites})
            for _ in range(num_layers)
        )
        self.invertible = (
            InvertibleAdapter(hidden_size, config.inv_reduction_factor, config.non_linearity) if config.invertible else None
        )

    def apply_at(self, layer: int, site: str, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module) -> torch.Tensor:
        """Transform the sub-layer output ``h`` (B, T, H) given its residual input ``x`` (B, T, H)."""
        block = self.layers[layer]
        if site not in block:
            return h
        if self.config.placement == "pfeiffer":
            return h + block[site](layer_norm(h + x))
        return h + block[site](h)


class _Site:
    """Hooks for one sub-layer: capture its residual input, then let each adapter of the stack act."""

    def __init__(self, stack: Sequence[AdapterModule], layer: int, site: str, layer_norm: nn.Module) -> None:
        self.stack, self.layer, self.site, self.layer_norm = stack, layer, site, layer_norm
        self.x: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.x = args[1] if len(args) > 1 else kwargs["input_tensor"]

    def transform(self, module: nn.Module, args: tuple, h: torch.Tensor) -> torch.Tensor:
        x, self.x = self.x, None
        if x is None:  # dropout called outside the sub-layer forward: leave it alone
            return h
        for adapter in self.stack:
            h = adapter.apply_at(self.layer, self.site, h, x, self.layer_norm)
        return h


class Hooks:
    """The hook handles one :func:`attach_adapters` call placed; ``remove()`` takes them all off."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def attach_adapters(model: nn.Module, arch: ArchSpec, stack: Sequence[AdapterModule]) -> Hooks:
    """Hook a stack of adapter modules (bottom first) into ``model``; returns the :class:`Hooks` placed.

    The invertible adapter of the first module that has one is used (MAD-X: the language
    adapter's), on the embedding layer's output and, inverted, on the MLM decoder's input.
    """
    handles: list = []
    layers = get_submodule(model, arch.layers)
    for i, layer in enumerate(layers):
        for site, path in (("attn", arch.attn_output), ("ffn", arch.ffn_output)):
            if not any(site in m.layers[i] for m in stack):
                continue
            sub = get_submodule(layer, path)
            hooks = _Site(stack, i, site, get_submodule(sub, arch.layer_norm))
            handles.append(sub.register_forward_pre_hook(hooks.capture, with_kwargs=True))
            handles.append(get_submodule(sub, arch.dropout).register_forward_hook(hooks.transform))
    inv = next((m.invertible for m in stack if m.invertible is not None), None)
    if inv is not None:
        # on the embedding layer's output (word + position + type, LayerNorm, dropout), as MAD-X and AdapterHub do
        embeddings = get_submodule(model, arch.embeddings)
        handles.append(embeddings.register_forward_hook(lambda mod, args, out: inv(out)))
        decoder = model.get_output_embeddings()  # None for task models: the inverse only precedes the MLM decoder
        if decoder is not None:  # prepend: with two language modules (f2 after f1 on the embeddings) the decoder
            # must see f1^-1(f2^-1(h)), so the inverse of the module applied last runs first
            handles.append(decoder.register_forward_pre_hook(lambda mod, args: (inv.inverse(args[0]),) + args[1:],
                                                             prepend=True))
    return Hooks(handles)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare_adapter(base, config: AdapterConfig, train_cfg) -> ModuleTrainable:
    """Start training a fresh adapter module on ``base`` (hooks stack above already-active modules)."""
    module = AdapterModule(config, base.hidden_size, len(base.layers)).to(_device(base.model))
    hooks = attach_adapters(base.model, base.arch, [module])
    return ModuleTrainable(module, hooks.remove, Phase("adapter", train_cfg.max_steps), "adapter")


def apply_adapter(base, loaded) -> AppliedModule:
    """Rebuild a saved adapter module, load its weights (strictly) and hook it onto ``base``, frozen.

    Frozen (``requires_grad=False``, its invertible adapter included) as in MAD-X and AdapterHub's
    ``train_adapter``: while a task module trains over it, backward neither computes nor stores its gradients.
    """
    config = build(AdapterConfig, loaded.manifest.config)
    module = AdapterModule(config, base.hidden_size, len(base.layers))
    state = loaded.tensors.get("adapter")
    if state is None:
        raise XlpeftError(f"adapter module {loaded.path} has no adapter.safetensors; it is incomplete: retrain or "
                          "re-convert it")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise XlpeftError(f"adapter weights in {loaded.path} do not fit this base: {str(exc).splitlines()[0]}") from None
    module.to(_device(base.model)).eval()
    module.requires_grad_(False)  # frozen: a task module trained above it computes and stores no gradient for it
    return AppliedModule(module, attach_adapters(base.model, base.arch, [module]).remove, "adapter")


SPEC = MethodSpec(
    name="adapter",
    config_cls=AdapterConfig,
    prepare=prepare_adapter,
    apply=apply_adapter,
    combine="stack",  # MAD-X: the task adapter transforms the language adapter's output (Pfeiffer et al. 2020)
    help="MAD-X bottleneck adapters (+ invertible embedding adapter for language modules)",
    defaults=AdapterConfig.defaults_for,
    files=("adapter",),
)
