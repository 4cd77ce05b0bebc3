"""Test tiers over the registered methods: which run the CLI-level checks in ``make test``.

The in-process method contract (``tests/methods/test_contract.py``) runs every method, always. The
CLI-level checks (kill -9 and resume, two data-parallel ranks) start subprocesses and take 30-90 s a
method on 2 cores, and what they add over the contract's ``resume_phase`` row is the recipes'
plumbing, which every method shares. ``make test`` runs them for the dense hooked module and the
multi-phase delta (:data:`CLI_TIER`); the other methods carry the ``exhaustive`` mark and run with
``make test-all`` (each passed there when it was added: lora, ia3, prefix, compacter, parallel
with AdapterDrop, mam).
"""

from __future__ import annotations

import pytest

from xlpeft.registry import method_names

CLI_TIER = ("adapter", "sft")
"""A dense hooked module trained in one phase (adapter) and a multi-phase sparse delta (sft): ~75 s each on 2 cores."""


def cli_methods() -> list:
    """``method_names()`` for ``parametrize``: the :data:`CLI_TIER` as is, the rest marked ``exhaustive``."""
    return [m if m in CLI_TIER else pytest.param(m, marks=pytest.mark.exhaustive) for m in method_names()]
