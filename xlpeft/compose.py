"""Activating saved modules on a base: adapters stack by hooks, deltas add into the weights.

Modules are activated bottom-up (language module first, then task module), which gives the
MAD-X Stack for adapters and θ0 + δ_lang + δ_task for sparse deltas; hybrids mix the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xlpeft.errors import XlpeftError
from xlpeft.io import LoadedModule
from xlpeft.registry import get_method


@dataclass
class Active:
    """Modules currently applied to a base; ``remove()`` restores the bare base exactly (reverse order)."""

    modules: list[LoadedModule] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        self.modules.clear()


def activate(base, modules: list[LoadedModule], force: bool = False) -> Active:
    """Apply ``modules`` (bottom first) to ``base`` after checking each was trained on this base."""
    active = Active()
    try:
        for module in modules:
            module.check_base(base.fingerprint, force=force)
            spec = get_method(module.manifest.method)
            active.handles.append(spec.activate(base, module))
            active.modules.append(module)
    except XlpeftError:
        active.remove()
        raise
    return active
