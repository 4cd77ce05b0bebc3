"""The one registry of module methods: a name maps to its :class:`~xlpeft.methods.base.MethodSpec`.

The registry holds specs and imports nothing of the methods: the built-in methods register
themselves when the ``xlpeft`` package is imported (``xlpeft/methods/__init__.py``), and a
plug-in registers its own spec with :func:`register_method`. The protocol a spec fulfils is
documented in :mod:`xlpeft.methods.base`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xlpeft.errors import XlpeftError

if TYPE_CHECKING:
    from xlpeft.methods.base import MethodSpec

_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    """Register a method; one name each, registering twice is an error."""
    if spec.name in _METHODS:
        raise XlpeftError(f"method {spec.name!r} is already registered; pick another name (registered: "
                          f"{', '.join(sorted(_METHODS))})")
    _METHODS[spec.name] = spec


def unregister_method(name: str) -> None:
    """Remove a registered method (for plug-ins under test); unknown names are an error."""
    get_method(name)
    del _METHODS[name]


def get_method(name: str) -> MethodSpec:
    """The spec registered as ``name``; an unknown name lists the available ones."""
    if name not in _METHODS:
        raise XlpeftError(f"unknown method {name!r}; available methods: {', '.join(sorted(_METHODS)) or 'none'}")
    return _METHODS[name]


def method_names() -> list[str]:
    """Every registered method, sorted."""
    return sorted(_METHODS)

