"""Gates: switch an applied module off and on without taking it off the base (multi-source training).

Multi-source task training (:mod:`xlpeft.multisource`) applies every source language's module
once, below the task module, and lets only the current batch's language act. A module applied
inside ``with gated(gate):`` keeps ``gate``: every hook it registers is wrapped by
:func:`gate_hook` (closed: the hook changes nothing), and a module that joins a site shared with
other modules (prefix tuning's per-attention sites) records the gate with :func:`current_gate`
and leaves its contribution out while it is closed. Outside any ``gated`` block (every other
use) no gate is current and the hooks are registered unchanged.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_CURRENT: contextvars.ContextVar[Gate | None] = contextvars.ContextVar("xlpeft_gate", default=None)


class Gate:
    """Whether the modules applied under it act (``open``) or leave every input unchanged."""

    def __init__(self, open: bool = True) -> None:
        self.open = open


@contextmanager
def gated(gate: Gate) -> Iterator[Gate]:
    """Modules applied inside the block obey ``gate``."""
    token = _CURRENT.set(gate)
    try:
        yield gate
    finally:
        _CURRENT.reset(token)


def current_gate() -> Gate | None:
    """The gate a module being applied now must obey, or None (always on)."""
    return _CURRENT.get()


def is_open(gate: Gate | None) -> bool:
    return gate is None or gate.open


def gate_hook(hook: Callable) -> Callable:
    """``hook`` as registered under the current gate: when it is closed, a hook that returns None (no change)."""
    gate = _CURRENT.get()
    if gate is None:
        return hook

    def gated_hook(*args, **kwargs):
        return hook(*args, **kwargs) if gate.open else None

    return gated_hook
