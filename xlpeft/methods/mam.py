"""MAM adapters (He et al., ICLR 2022, "Towards a Unified View", §4.5 "mix-and-match"): prefix tuning + a parallel adapter.

One module holds both parts: key/value prefixes in every layer's self-attention (Li & Liang 2021,
:mod:`xlpeft.methods.prefix`, MLP-reparameterised in training and dropped at export) and a
scaled parallel adapter beside every FFN (:mod:`xlpeft.methods.parallel`). They train together,
save into one module directory (``parallel.safetensors`` and ``prefix.safetensors``, each in its
own method's layout), and apply and remove together.

Defaults are AdapterHub 1.3.0's ``MAMConfig`` (``mam``): ``PrefixTuningConfig(bottleneck_size=800)``,
i.e. prefix length 30 through an MLP of width 800, and ``ParBnConfig()``: FFN parallel adapter,
reduction factor 2, relu, scaling 4. (He et al. use l = 30 prefixes with a 512-wide FFN adapter on
BART/mBART.) The prefix part keeps the real tokens' positions, as AdapterHub does
(``shift_positions=False``). Because the prefixes are attended to from the first step an untrained
MAM module is not the identity (``identity_at_init=False``); its parallel adapter alone is.

AdapterDrop (``adapter_drop``, ``--adapter-drop``) drops only the parallel adapter; prefixes are kept
(:mod:`xlpeft.methods.adapterdrop`).

AdapterHub names: the adapter part's as in :mod:`xlpeft.methods.parallel` (``...output.adapters.{a}.adapter_down.0.*``
-> ``parallel``: ``layers.{i}.ffn.down.*``, ``adapter_up.*`` -> ``layers.{i}.ffn.up.*``, ``scaling`` -> ``scaling``);
the prefix part (``{p}.prefix_tuning.prefix_tunings.{a}.self_prefix.{wte,control_trans}.*``) is run through its MLP once
and written in the prefix method's layout (``prefix``: ``key``/``value`` (L, P, H)), as for a ``prefix_tuning`` adapter.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xlpeft.config import build, check_fields
from xlpeft.errors import XlpeftError
from xlpeft.methods.adapterdrop import DropTrainable, check_train_drop
from xlpeft.methods.adapters import HookedAdapter, attach_adapters, device_of
from xlpeft.methods.base import AppliedModule, MethodSpec, ModuleTrainable, Phase
from xlpeft.methods.bottleneck import ACTIVATIONS
from xlpeft.methods.parallel import ParallelConfig, ParallelModule
from xlpeft.methods.prefix import PrefixConfig, PrefixEncoder, SavedPrefixes, attach_prefix, expected_shapes

PARALLEL, PREFIX = "parallel", "prefix"
"""The two tensor files of a MAM module."""


@dataclass(frozen=True)
class MAMConfig:
    """Hyper-parameters of a MAM module; defaults are AdapterHub 1.3.0's ``MAMConfig`` (He et al. 2022)."""

    prefix_length: int = field(default=30, metadata={"help": "prefix vectors per layer (He et al. 2022: 30)", "min": 1})
    width: int = field(default=800, metadata={
        "help": "hidden width of the prefix's reparameterisation MLP (AdapterHub's MAMConfig: 800)", "min": 1})
    reduction_factor: float = field(default=2.0, metadata={
        "help": "hidden size / width of the FFN parallel adapter (AdapterHub's par_bn: 2)", "gt": 0.0})
    non_linearity: str = field(default="relu", metadata={
        "help": "parallel adapter activation (par_bn: relu)", "choices": tuple(ACTIVATIONS)})
    scaling: float = field(default=4.0, metadata={
        "help": "s in h + s * A(x) of the parallel adapter (He et al. 2022: 4)", "gt": 0.0})
    adapter_drop: int = field(default=0, metadata={
        "help": "robust AdapterDrop of the parallel adapter in training (Rücklé et al. 2021): each step skips the "
                "lowest k layers, k uniform in 0..N (0: off; at most layers - 1); prefixes are never dropped", "min": 0})

    def __post_init__(self) -> None:
        check_fields(self)

    def prefix_config(self) -> PrefixConfig:
        return PrefixConfig(prefix_length=self.prefix_length, layers="all", reparameterise=True, width=self.width)

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(placement="ffn", reduction_factor=self.reduction_factor,
                              non_linearity=self.non_linearity, scaling=self.scaling)


class MAMModule(HookedAdapter):
    """A parallel adapter (``parallel``) and a prefix source (``prefix``: trainable encoder or saved prefixes)."""

    def __init__(self, config: MAMConfig, hidden_size: int, num_layers: int, prefix: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.parallel = ParallelModule(config.parallel_config(), hidden_size, num_layers)
        self.prefix = prefix if prefix is not None else PrefixEncoder(config.prefix_config(), hidden_size, num_layers)

    def sites(self, layer: int) -> Collection[str]:
        return self.parallel.sites(layer)

    def apply_at(self, layer: int, site: str, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module) -> torch.Tensor:
        return self.parallel.apply_at(layer, site, h, x, layer_norm)

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        """The saved tensors: the parallel adapter's state and the prefixes in the prefix method's layout."""
        prefix = self.prefix.export() if isinstance(self.prefix, PrefixEncoder) else dict(self.prefix.state_dict())
        return {PARALLEL: dict(self.parallel.state_dict()), PREFIX: prefix}


def attach_mam(base, module: MAMModule):
    """Hook both parts onto ``base``; returns a detach function taking both off (idempotent)."""
    hooks = attach_adapters(base.model, base.arch, [module])
    attachment = attach_prefix(base.model, base.arch, module.prefix)

    def detach() -> None:
        attachment.remove()
        hooks.remove()

    return detach


class MAMTrainable(ModuleTrainable):
    """The checkpoint is the module's state (prefix MLP included); the export the two saved parts."""

    def export(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        return self.module.export(), {}


class MAMDropTrainable(DropTrainable):
    """:class:`MAMTrainable` with robust AdapterDrop of the parallel adapter."""

    def export(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        return self.module.export(), {}


def prepare_mam(base, config: MAMConfig, train_cfg) -> ModuleTrainable:
    """Start training a fresh MAM module on ``base`` (prefixes above those applied, adapter above the adapters)."""
    check_train_drop(config.adapter_drop, len(base.layers))
    module = MAMModule(config, base.hidden_size, len(base.layers)).to(device_of(base.model))
    detach, phase = attach_mam(base, module), Phase("mam", train_cfg.max_steps)
    if config.adapter_drop:
        return MAMDropTrainable(module, detach, phase, "mam", config.adapter_drop, train_cfg.seed)
    return MAMTrainable(module, detach, phase, "mam")


@dataclass
class AppliedMAM(AppliedModule):
    """Applied MAM: a composed checkpoint re-applies it from the same two files it was loaded from."""

    def saved_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.module.export()


def apply_mam(base, loaded) -> AppliedMAM:
    """Rebuild a saved MAM module (both parts checked against the base) and hook it onto ``base``, frozen."""
    config = build(MAMConfig, loaded.manifest.config)
    missing = [stem for stem in (PARALLEL, PREFIX) if stem not in loaded.tensors]
    if missing:
        raise XlpeftError(f"mam module {loaded.path} has no {', '.join(s + '.safetensors' for s in missing)}; it is "
                          "incomplete: retrain or re-convert it")
    prefix_state = loaded.tensors[PREFIX]
    expected = expected_shapes(config.prefix_config(), base.hidden_size, len(base.layers))
    got = {k: tuple(v.shape) for k, v in prefix_state.items()}
    if got != expected:
        raise XlpeftError(f"mam prefix tensors in {loaded.path} do not fit this base: expected {expected}, got {got}; "
                          "apply it to the base it was trained on")
    module = MAMModule(config, base.hidden_size, len(base.layers), SavedPrefixes(config.prefix_config(), prefix_state))
    try:
        module.parallel.load_state_dict(loaded.tensors[PARALLEL], strict=True)
    except RuntimeError as exc:
        raise XlpeftError(f"mam parallel-adapter weights in {loaded.path} do not fit this base: "
                          f"{str(exc).splitlines()[0]}") from None
    module.to(device_of(base.model)).eval()
    module.requires_grad_(False)  # frozen, as every applied module
    return AppliedMAM(module, attach_mam(base, module), "mam")


SPEC = MethodSpec(
    name="mam",
    config_cls=MAMConfig,
    prepare=prepare_mam,
    apply=apply_mam,
    combine="stack",  # prefixes concatenate and the adapter acts after those below, as each part alone does
    help="MAM adapters (He et al. 2022): prefix tuning (length 30) in attention + a parallel adapter (s=4) beside the FFN",
    files=(PARALLEL, PREFIX),
    identity_at_init=False,  # the prefixes are attended to from step 0
    prepare_checks_base=True,  # what prepare checks against the base (targets, sizes, layers) fails before a run opens
)
