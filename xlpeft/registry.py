"""The one registry of module methods: a name maps to its config class and its functions.

A method plugs into training through the small :class:`Trainable` protocol (phases, the
parameters to optimise in each, a step hook, export) rather than by subclassing a trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from xlpeft.errors import XlpeftError


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

    def export(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Tensors to save (file stem -> state dict) and extra manifest fields."""

    def close(self) -> None:
        """Detach from the base model, restoring it exactly."""


@dataclass(frozen=True)
class MethodSpec:
    """A method: its config dataclass, how to start training one, how to activate a saved one."""

    name: str
    config_cls: type
    prepare: Callable[..., Trainable]  # (base, method config, TrainConfig) -> Trainable
    activate: Callable[..., Any]  # (base, loaded modules) -> an object with .remove()
    help: str = ""


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    """Register a method; one name each, registering twice is an error."""
    if spec.name in _METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec


def get_method(name: str) -> MethodSpec:
    import xlpeft.methods  # noqa: F401  (registers the built-in methods)

    if name not in _METHODS:
        raise XlpeftError(f"unknown method {name!r}; available methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_names() -> list[str]:
    import xlpeft.methods  # noqa: F401

    return sorted(_METHODS)
