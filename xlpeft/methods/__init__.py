"""Built-in methods, registered when the ``xlpeft`` package is imported.

Each method is one module (or package) holding its config dataclass, its layers, its injection
and its :class:`~xlpeft.methods.base.MethodSpec` (``SPEC``); adding a method is one module, one
line below and one row in the method-contract tests (which iterate over ``method_names()``).
"""

from xlpeft.methods import adapters, compacter, fusion, ia3, lora, mam, parallel, prefix, sft
from xlpeft.registry import register_method

for _spec in (adapters.SPEC, sft.SPEC, prefix.SPEC, lora.SPEC, ia3.SPEC, compacter.SPEC, parallel.SPEC, mam.SPEC,
              fusion.SPEC):
    register_method(_spec)
