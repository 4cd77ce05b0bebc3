"""MAD-X bottleneck adapters (Pfeiffer et al., EMNLP 2020; Houlsby et al., ICML 2019), and the hooks every adapter-like method uses.

Placement follows AdapterHub's definitions so weights interoperate. With ``h`` the output of
a sub-layer's dense+dropout and ``x`` the sub-layer input (the residual stream):

* ``pfeiffer`` (after the FFN only):  h <- h + A(LN(h + x)), then the model computes LN(h + x);
* ``houlsby`` (after attention and FFN):  h <- h + A(h), then LN(h + x).

Several adapters at one site form a Stack (MAD-X: language adapter below the task adapter):
each transforms ``h`` in turn. Injection uses hooks only: a pre-hook on the sub-layer output
module captures ``x``; a forward hook on its dropout rewrites ``h``. No transformers class is edited.

The hook machinery (:func:`attach_adapters`) serves any *adapter-like* module, a
:class:`HookedAdapter`: per layer the sites it acts at (``attn``, ``ffn``) and
``apply_at(layer, site, h, x, layer_norm)``. MAD-X adapters (here), Compacter
(:mod:`xlpeft.methods.compacter`), parallel adapters (:mod:`xlpeft.methods.parallel`) and MAM's
adapter part implement it; AdapterDrop (:mod:`xlpeft.methods.adapterdrop`) skips the lowest layers
of any of them through :meth:`HookedAdapter.skips`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from xlpeft.config import build, check_fields
from xlpeft.errors import XlpeftError
from xlpeft.methods.base import AppliedModule, MethodSpec, ModuleTrainable, Phase
from xlpeft.methods.bottleneck import ACTIVATIONS, Bottleneck
from xlpeft.methods.gates import gate_hook
from xlpeft.methods.invertible import InvertibleAdapter
from xlpeft.models import ArchSpec, get_submodule

PLACEMENTS = {"pfeiffer": ("ffn",), "houlsby": ("attn", "ffn")}
PLACEMENT_ACTIVATIONS = {"pfeiffer": "relu", "houlsby": "swish"}
"""The default non-linearity per placement: AdapterHub 1.3.0's SeqBnConfig (relu) and DoubleSeqBnConfig (swish)."""
SITES = ("attn", "ffn")
"""The sub-layer outputs an adapter-like module can act at: after self-attention, after the FFN."""


class HookedAdapter(nn.Module):
    """The protocol of an adapter-like module that :func:`attach_adapters` hooks into a base.

    Subclasses implement :meth:`sites` and :meth:`apply_at`, and :meth:`invertible_adapter` if they
    carry an embedding-level invertible adapter. AdapterDrop (Rücklé et al., EMNLP 2021) needs no
    code in a subclass: ``drop_below`` (inference: the lowest n layers never run this module) and
    ``step_drop`` (training: the lowest k layers skip it in this step, only while the base is in
    training mode) are plain attributes, not parameters or buffers, so they never enter a saved module.
    """

    def __init__(self) -> None:
        super().__init__()
        self.drop_below = 0  # AdapterDrop at inference: layers < drop_below skip this module
        self.step_drop = 0  # AdapterDrop in training: layers < step_drop skip it in the current step

    def sites(self, layer: int) -> Collection[str]:
        """The sites (``attn``, ``ffn``) this module acts at in ``layer``."""
        raise NotImplementedError

    def apply_at(self, layer: int, site: str, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module) -> torch.Tensor:
        """The new sub-layer output from its output ``h`` (B, T, H) and input ``x`` (B, T, H), before the model's LN(h + x)."""
        raise NotImplementedError

    def invertible_adapter(self) -> InvertibleAdapter | None:
        """The NICE block this module applies on the embeddings (and inverts before the MLM decoder), if any."""
        return None

    def fusion_placement(self) -> str | None:
        """``pfeiffer``/``houlsby`` for a sequential bottleneck AdapterFusion can fuse (:meth:`up_at`); None otherwise."""
        return None

    def up_at(self, layer: int, site: str, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module) -> torch.Tensor:
        """What this module adds to ``h`` (B, T, H) at the site: AdapterFusion's value for it (:mod:`.fusion`)."""
        raise XlpeftError(f"{type(self).__name__} is not a sequential bottleneck adapter; AdapterFusion cannot fuse it")

    def skips(self, layer: int, training: bool) -> bool:
        """Whether AdapterDrop leaves ``layer`` without this module (``training``: the base is in training mode)."""
        return layer < self.drop_below or (training and layer < self.step_drop)


def bottleneck_up(placement: str, bottleneck: nn.Module, h: torch.Tensor, x: torch.Tensor,
                  layer_norm: nn.Module) -> torch.Tensor:
    """What a sequential bottleneck adds to ``h`` at one site: ``pfeiffer`` A(LN(h + x)), ``houlsby`` A(h). (B, T, H)."""
    if placement == "pfeiffer":
        return bottleneck(layer_norm(h + x))
    return bottleneck(h)


def bottleneck_at(placement: str, bottleneck: nn.Module, h: torch.Tensor, x: torch.Tensor,
                  layer_norm: nn.Module) -> torch.Tensor:
    """A sequential bottleneck adapter at one site: ``pfeiffer`` h + A(LN(h + x)), ``houlsby`` h + A(h). (B, T, H)."""
    return h + bottleneck_up(placement, bottleneck, h, x, layer_norm)


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
    adapter_drop: int = field(default=0, metadata={
        "help": "robust AdapterDrop in training (Rücklé et al. 2021): each step skips the adapters of the lowest k "
                "layers, k drawn uniformly from 0..N (0: off; at most layers - 1)", "min": 0})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.non_linearity is None:  # resolved here, so manifests record the activation actually used
            object.__setattr__(self, "non_linearity", PLACEMENT_ACTIVATIONS[self.placement])

    @classmethod
    def defaults_for(cls, kind: str) -> dict:
        """MAD-X defaults per module kind: language adapters rf 2 + invertible; task adapters rf 16, none."""
        return {"reduction_factor": 16.0, "invertible": False} if kind == "task" else {}


class AdapterModule(HookedAdapter):
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

    def sites(self, layer: int) -> Collection[str]:
        return self.layers[layer].keys()

    def invertible_adapter(self) -> InvertibleAdapter | None:
        return self.invertible

    def apply_at(self, layer: int, site: str, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module) -> torch.Tensor:
        """Transform the sub-layer output ``h`` (B, T, H) given its residual input ``x`` (B, T, H)."""
        block = self.layers[layer]
        if site not in block:
            return h
        return bottleneck_at(self.config.placement, block[site], h, x, layer_norm)

    def fusion_placement(self) -> str:
        return self.config.placement

    def up_at(self, layer: int, site: str, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module) -> torch.Tensor:
        return bottleneck_up(self.config.placement, self.layers[layer][site], h, x, layer_norm)  # (B, T, H)


class _Site:
    """Hooks for one sub-layer: capture its residual input, then let each adapter of the stack act."""

    def __init__(self, stack: Sequence[HookedAdapter], layer: int, site: str, layer_norm: nn.Module) -> None:
        self.stack, self.layer, self.site, self.layer_norm = stack, layer, site, layer_norm
        self.x: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.x = args[1] if len(args) > 1 else kwargs["input_tensor"]

    def transform(self, module: nn.Module, args: tuple, h: torch.Tensor) -> torch.Tensor:
        x, self.x = self.x, None
        if x is None:  # dropout called outside the sub-layer forward: leave it alone
            return h
        for adapter in self.stack:
            if self.site in adapter.sites(self.layer) and not adapter.skips(self.layer, module.training):
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


def attach_adapters(model: nn.Module, arch: ArchSpec, stack: Sequence[HookedAdapter]) -> Hooks:
    """Hook a stack of adapter-like modules (bottom first) into ``model``; returns the :class:`Hooks` placed.

    The invertible adapter of the first module that has one is used (MAD-X: the language
    adapter's), on the embedding layer's output and, inverted, on the MLM decoder's input.
    """
    handles: list = []
    layers = get_submodule(model, arch.layers)
    for i, layer in enumerate(layers):
        for site, path in (("attn", arch.attn_output), ("ffn", arch.ffn_output)):
            if not any(site in m.sites(i) for m in stack):
                continue
            sub = get_submodule(layer, path)
            hooks = _Site(stack, i, site, get_submodule(sub, arch.layer_norm))
            handles.append(sub.register_forward_pre_hook(gate_hook(hooks.capture), with_kwargs=True))
            handles.append(get_submodule(sub, arch.dropout).register_forward_hook(gate_hook(hooks.transform)))
    inv = next((m.invertible_adapter() for m in stack if m.invertible_adapter() is not None), None)
    if inv is not None:
        # on the embedding layer's output (word + position + type, LayerNorm, dropout), as MAD-X and AdapterHub do
        embeddings = get_submodule(model, arch.embeddings)
        handles.append(embeddings.register_forward_hook(gate_hook(lambda mod, args, out: inv(out))))
        decoder = model.get_output_embeddings()  # None for task models: the inverse only precedes the MLM decoder
        if decoder is not None:  # prepend: with two language modules (f2 after f1 on the embeddings) the decoder
            # must see f1^-1(f2^-1(h)), so the inverse of the module applied last runs first
            handles.append(decoder.register_forward_pre_hook(
                gate_hook(lambda mod, args: (inv.inverse(args[0]),) + args[1:]), prepend=True))
    return Hooks(handles)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare_hooked(base, module: HookedAdapter, config, train_cfg, stem: str, phase: str) -> ModuleTrainable:
    """Start training a fresh adapter-like ``module`` on ``base`` (hooks stack above already-active modules).

    With ``config.adapter_drop`` > 0 the trainable draws AdapterDrop's k every step (:mod:`.adapterdrop`).
    """
    from xlpeft.methods.adapterdrop import DropTrainable, check_train_drop

    check_train_drop(config.adapter_drop, len(base.layers))
    module = module.to(device_of(base.model))
    hooks = attach_adapters(base.model, base.arch, [module])
    step = Phase(phase, train_cfg.max_steps)
    if config.adapter_drop:
        return DropTrainable(module, hooks.remove, step, stem, config.adapter_drop, train_cfg.seed)
    return ModuleTrainable(module, hooks.remove, step, stem)


def apply_hooked(base, loaded, module: HookedAdapter, stem: str, method: str) -> AppliedModule:
    """Load a saved adapter-like module's weights (strictly) into ``module`` and hook it onto ``base``, frozen.

    Frozen (``requires_grad=False``) as in MAD-X and AdapterHub's ``train_adapter``: while a task module
    trains over it, backward neither computes nor stores its gradients.
    """
    return hook_applied(base, load_hooked(base, loaded, module, stem, method), stem)


def hook_applied(base, module: HookedAdapter, stem: str) -> AppliedModule:
    """A built, frozen adapter-like module hooked onto ``base``, as the :class:`Applied` handle ``spec.apply`` returns."""
    return AppliedModule(module, attach_adapters(base.model, base.arch, [module]).remove, stem)


def load_hooked(base, loaded, module: HookedAdapter, stem: str, method: str) -> HookedAdapter:
    """``module`` with a saved module's weights loaded strictly, on the base's device, frozen, not hooked."""
    state = loaded.tensors.get(stem)
    if state is None:
        raise XlpeftError(f"{method} module {loaded.path} has no {stem}.safetensors; it is incomplete: retrain or "
                          "re-convert it")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise XlpeftError(f"{method} weights in {loaded.path} do not fit this base: {str(exc).splitlines()[0]}") from None
    module.to(device_of(base.model)).eval()
    module.requires_grad_(False)  # frozen: a task module trained above it computes and stores no gradient for it
    return module


def prepare_adapter(base, config: AdapterConfig, train_cfg) -> ModuleTrainable:
    """Start training a fresh adapter module on ``base`` (hooks stack above already-active modules)."""
    module = AdapterModule(config, base.hidden_size, len(base.layers))
    return prepare_hooked(base, module, config, train_cfg, "adapter", "adapter")


def apply_adapter(base, loaded) -> AppliedModule:
    """Rebuild a saved adapter module, load its weights (strictly) and hook it onto ``base``, frozen (invertible adapter included)."""
    return hook_applied(base, build_adapter(base, loaded), "adapter")


def build_adapter(base, loaded) -> AdapterModule:
    """A saved adapter module rebuilt, frozen and not hooked: what AdapterFusion fuses (:mod:`.fusion`)."""
    config = build(AdapterConfig, loaded.manifest.config)
    return load_hooked(base, loaded, AdapterModule(config, base.hidden_size, len(base.layers)), "adapter", "adapter")


SPEC = MethodSpec(
    name="adapter",
    config_cls=AdapterConfig,
    prepare=prepare_adapter,
    apply=apply_adapter,
    combine="stack",  # MAD-X: the task adapter transforms the language adapter's output (Pfeiffer et al. 2020)
    help="MAD-X bottleneck adapters (+ invertible embedding adapter for language modules)",
    defaults=AdapterConfig.defaults_for,
    files=("adapter",),
    build=build_adapter,
    prepare_checks_base=True,  # what prepare checks against the base (targets, sizes, layers) fails before a run opens
)
