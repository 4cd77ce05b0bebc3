"""The method protocol: everything generic code may know about a module method, in one place.

A method (MAD-X adapters, LT-SFT, ...) is one module that builds a :class:`MethodSpec` and
registers it (:func:`xlpeft.registry.register_method`). Generic code (recipes, composition,
tracking, the CLI) talks to methods only through the spec and the two handle protocols below;
it never compares method names or probes for optional attributes.

* **Training** (:class:`Trainable`): phases, the parameters to optimise in each, a step hook,
  the state a checkpoint holds, export, and what every data-parallel rank must agree on.
* **Applying a saved module** (:class:`Applied`): ``spec.apply(base, module)`` changes the base
  (hooks or in-place weights); ``remove()`` restores it bit-exactly. One handle type, one verb pair.
* **Composing** (``spec.combine``): how a module joins the ones below it: ``stack`` (a function
  applied to the hidden states in turn, Pfeiffer et al. 2020) or ``sum`` (a delta added to the
  weights, θ0 + δ_lang + δ_task, Ansell et al. 2022).
* **Overlap** (``spec.overlap``): how much two modules of the method touch the same weights.
* **Saving inside a composed model** (``Applied.saved_tensors``): what must be written beside the
  merged checkpoint to rebuild the composition (adapters), nothing when it is merged into the
  weights (deltas).
* **Defaults per module kind** (``spec.defaults`` / ``spec.train_defaults``): the published
  recipe for language and task modules, and ``spec.dropped_by``: defaults an explicit training
  key replaces.
* **Planning** (``spec.plan``): check the method config against the training config before any
  run opens, and turn epoch-based lengths into steps once the data size is known.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from xlpeft.errors import XlpeftError

if TYPE_CHECKING:
    from xlpeft.config import TrainConfig
    from xlpeft.io import LoadedModule

MODULE_KINDS = ("language", "task")
COMBINES = ("stack", "sum")
"""``stack``: applied to the hidden states after the modules below; ``sum``: added into the weights."""


@dataclass(frozen=True)
class Phase:
    """One training phase of a method.

    ``reset_extras``: before the phase starts, the dense modules trained alongside (a task head)
    go back to their initial values, as composable-sft's LT-SFT resets every parameter before
    its sparse phase.
    """

    name: str
    steps: int
    reset_extras: bool = False


class Trainable(Protocol):
    """What the training loop needs from a method being trained."""

    phases: list[Phase]

    def begin_phase(self, phase: Phase) -> list[nn.Parameter]:
        """Prepare the phase; return the parameters the optimizer should update."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue the current phase exactly (for checkpoints)."""

    def resume_phase(self, phase: Phase, state: dict[str, torch.Tensor]) -> list[nn.Parameter]:
        """Enter ``phase`` in the state ``state_dict()`` captured (instead of ``begin_phase``)."""

    def after_step(self, phase: Phase, step: int) -> None:
        """Called after every optimizer step (e.g. to accumulate movement scores)."""

    def end_phase(self, phase: Phase) -> dict[str, float]:
        """Finish the phase; return metrics to log (e.g. selection time)."""

    def replicated(self) -> torch.Tensor | None:
        """State every data-parallel rank must hold identically after a phase (LT-SFT's mask), or None."""

    def export(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Tensors to save (file stem -> state dict) and extra manifest fields."""

    def close(self) -> None:
        """Detach from the base model, restoring it exactly."""


class Applied(Protocol):
    """A saved module applied to a base (hooks or in-place weights)."""

    def remove(self) -> None:
        """Restore the base exactly as it was before ``apply``; safe to call twice."""

    def modules(self) -> list[nn.Module]:
        """The ``nn.Module`` s the composed model must own (so ``.to(device)`` moves them); [] if none."""

    def saved_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """What a composed checkpoint must hold beside its weights to rebuild this module (file stem -> state).

        Empty when the module is merged into the weights (a delta): the checkpoint already holds it.
        """


class ModuleTrainable:
    """The :class:`Trainable` of a method whose module is one dense ``nn.Module`` trained in one phase.

    Adapters (and LoRA-like methods) need nothing more: the module's parameters are the optimiser's,
    its state dict is the checkpoint and the export, and ``detach`` takes its hooks off the base.
    """

    def __init__(self, module: nn.Module, detach: Callable[[], None], phase: Phase, stem: str) -> None:
        self.module, self._detach, self.stem = module, detach, stem
        self.phases = [phase]

    def begin_phase(self, phase: Phase) -> list[nn.Parameter]:
        self.module.train()
        return list(self.module.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def resume_phase(self, phase: Phase, state: dict[str, torch.Tensor]) -> list[nn.Parameter]:
        self.module.load_state_dict(state, strict=True)
        return self.begin_phase(phase)

    def after_step(self, phase: Phase, step: int) -> None:
        pass

    def end_phase(self, phase: Phase) -> dict[str, float]:
        return {}

    def replicated(self) -> None:
        return None  # dense parameters: summed gradients keep every rank's copy equal

    def export(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        return {self.stem: self.module.state_dict()}, {}

    def close(self) -> None:
        self._detach()


@dataclass
class AppliedModule:
    """The :class:`Applied` handle of a saved dense module hooked onto a base (adapters, ...).

    ``remove()`` runs ``detach`` (idempotent); hooks are not part of a checkpoint, so the module's
    weights are what a composed model saves beside its own (under ``stem``).
    """

    module: nn.Module
    detach: Callable[[], None]
    stem: str

    def remove(self) -> None:
        self.detach()

    def modules(self) -> list[nn.Module]:
        return [self.module]

    def saved_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {self.stem: self.module.state_dict()}


def no_defaults(kind: str) -> dict[str, Any]:
    """The default of ``MethodSpec.defaults`` / ``train_defaults``: nothing beyond the dataclasses' own."""
    return {}


def no_parents(extra: dict[str, Any]) -> list[str]:
    """The default of ``MethodSpec.parents``: a module built from nothing but the base."""
    return []


def plan_as_is(method_cfg: Any, train_cfg: TrainConfig, num_examples: int | None) -> Any:
    """The default of ``MethodSpec.plan``: the method config needs no planning."""
    return method_cfg


@dataclass(frozen=True)
class MethodSpec:
    """A method, complete: how it trains, applies, combines, overlaps, saves, and its defaults per kind.

    Attributes:
        name: the ``--method`` value and the suffix of registered names (``xlpeft-lang-sw-<name>``).
        config_cls: its frozen config dataclass (``--set`` keys, validated on creation).
        prepare: ``(base, method config, TrainConfig) -> Trainable``: start training a fresh module
            on top of whatever is applied to the base.
        apply: ``(base, LoadedModule) -> Applied``: apply a saved module, frozen.
        combine: ``stack`` or ``sum`` (see :data:`COMBINES`).
        help: one line for ``xlpeft methods``.
        defaults: ``kind -> {field: value}``: method-config defaults of the published recipe per kind.
        train_defaults: ``kind -> {field: value}``: TrainConfig defaults of that recipe (e.g. lr).
        dropped_by: ``{TrainConfig key: (method fields, ...)}``: per-kind defaults an explicit value
            of that training key drops (LT-SFT's task epochs give way to an explicit ``max_steps``).
        plan: ``(method config, TrainConfig, number of training examples or None) -> method config``:
            called with None before any run opens (raise if the configs cannot work together) and
            with the count once the data is read (e.g. epochs -> steps).
        overlap: ``(lower, upper) -> {bucket: count}``: entries two modules of this method share,
            or None when the notion does not apply.
        files: the tensor files (stems) a saved module holds, for readers and tests.
        identity_at_init: True when an untrained module leaves the base's outputs unchanged (an
            adapter's zero up-projection, LoRA's B = 0, (IA)³'s unit scales, an SFT's zero delta).
            False for methods that cannot start as the identity (prefix tuning's prefixes attend
            from step 0, Li & Liang 2021); the contract tests then check the opposite.
        prepare_checks_base: True when ``prepare`` validates the config against the base (a target
            that matches no layer, a PHM dimension that does not divide the hidden size, more dropped
            layers than the base has): :meth:`check` then runs it dry before any run opens. Leave it
            False for methods whose module is costly to build (LT-SFT copies θ0).
        weight_delta: ``(base, LoadedModule) -> {param: (flat indices, values)}``: the module's change to
            the base's weights, for ``xlpeft merge``; None for modules that run beside the weights
            (adapters, prefixes, (IA)³), which compose but do not merge.
        merge_own: ``(modules, weights, scale) -> (config, tensors) | None``: a weighted sum of modules of
            this method as one module of the same method, exactly (LoRA: ranks concatenated), or None
            when these modules cannot (then they merge as sparse deltas).
        delta_carrier: ``(entries, parent modules) -> (config, tensors)``: a module of this method that
            holds any merged weight delta (sft: a sparse delta).
        build: ``(base, LoadedModule) -> nn.Module``: the saved module rebuilt, frozen and not hooked, for
            methods AdapterFusion can fuse (sequential bottlenecks: adapter, compacter); None for the others.
        trains_in_place: True when ``prepare``'s trainable writes the base's own weights (LT-SFT's phases)
            rather than modules beside them; multi-source task training then refuses language modules
            merged into those weights (:mod:`xlpeft.multisource`), whose exact revert would undo the task's updates.
        parents: ``manifest extra -> [source, ...]``: the modules a trained module is built from and carries
            (AdapterFusion: the fused adapters), tagged ``xlpeft.parent.<i>`` on its run and registry version
            and listed in the version's description, as ``xlpeft merge`` tags its parents.
    """

    name: str
    config_cls: type
    prepare: Callable[[Any, Any, TrainConfig], Trainable]
    apply: Callable[[Any, LoadedModule], Applied]
    combine: str
    help: str = ""
    defaults: Callable[[str], dict[str, Any]] = no_defaults
    train_defaults: Callable[[str], dict[str, Any]] = no_defaults
    dropped_by: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    plan: Callable[[Any, TrainConfig, int | None], Any] = plan_as_is
    overlap: Callable[[LoadedModule, LoadedModule], dict[str, int]] | None = None
    files: tuple[str, ...] = ()
    identity_at_init: bool = True
    prepare_checks_base: bool = False
    weight_delta: Callable[[Any, LoadedModule], dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None
    merge_own: Callable[[list[LoadedModule], list[float], float], tuple[dict, dict] | None] | None = None
    delta_carrier: Callable[[dict, list[LoadedModule]], tuple[dict, dict]] | None = None
    trains_in_place: bool = False
    build: Callable[[Any, LoadedModule], nn.Module] | None = None
    parents: Callable[[dict[str, Any]], list[str]] = no_parents

    def __post_init__(self) -> None:
        problems = []
        if not self.name or not self.name.replace("_", "").isalnum() or not self.name.islower():
            problems.append(f"name should be lower-case letters, digits and _ (it ends registered names); got {self.name!r}")
        if self.combine not in COMBINES:
            problems.append(f"combine should be one of {', '.join(COMBINES)}; got {self.combine!r}")
        if not isinstance(self.config_cls, type):
            problems.append(f"config_cls should be a dataclass type; got {self.config_cls!r}")
        if problems:
            raise XlpeftError(f"invalid MethodSpec {self.name!r}: " + "; ".join(problems))

    def check(self, base: Any, method_cfg: Any, train_cfg: TrainConfig) -> None:
        """Raise what ``prepare`` would raise on this base, before an MLflow run exists (a dry run, then ``close()``).

        The dry run draws from a forked random stream; the recipes seed again before the real ``prepare``.
        """
        if self.prepare_checks_base:
            with torch.random.fork_rng(devices=[]):
                self.prepare(base, method_cfg, train_cfg).close()

    def kind_defaults(self, kind: str) -> dict[str, Any]:
        """Method-config and training defaults of the published recipe for ``kind`` (shown by ``xlpeft methods``)."""
        return {**self.defaults(kind), **self.train_defaults(kind)}
