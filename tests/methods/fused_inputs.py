"""Modules for a fusion to fuse in the method-contract rows: settings the fusion config cannot default.

A fusion's ``fuse`` names existing modules on the base in use, so its contract rows need some: two
MAD-X adapters (one with an invertible adapter, so the fusion's first-module rule shows) with every
weight drawn from a fixed seed (std 0.2), saved once per base for the whole test session.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from xlpeft.io import Manifest, save_module
from xlpeft.methods.adapters import AdapterConfig, AdapterModule

_ROOT: list[Path] = []
_MADE: dict[str, str] = {}


def fused_adapters(base, count: int = 2) -> str:
    """``count`` random adapter modules on ``base``, saved once; their directories comma-separated (``--set fuse=``)."""
    key = f"{base.fingerprint}-{count}"
    if key not in _MADE:
        if not _ROOT:
            _ROOT.append(Path(tempfile.mkdtemp(prefix="xlpeft-fused-")))
            atexit.register(shutil.rmtree, _ROOT[0], True)
        gen = torch.Generator().manual_seed(5)
        paths = []
        for i in range(count):
            config = AdapterConfig(reduction_factor=4, invertible=i == 0)
            module = AdapterModule(config, base.hidden_size, len(base.layers))
            state = {k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in module.state_dict().items()}
            manifest = Manifest(kind="language", method="adapter", config=asdict(config), lang=f"l{i}",
                                base={"name": base.name, "fingerprint": base.fingerprint,
                                      "model_type": base.model.config.model_type})
            paths.append(str(save_module(_ROOT[0] / f"{key}-{i}", manifest, {"adapter": state})))
        _MADE[key] = ",".join(paths)
    return _MADE[key]


def needed_settings(method: str, base) -> dict[str, str]:
    """What ``method``'s config needs from the base in use beyond its defaults (only a fusion needs anything)."""
    return {"fuse": fused_adapters(base)} if method == "fusion" else {}


def cli_settings(method: str, base_dir) -> list[str]:
    """:func:`needed_settings` as ``--set`` arguments, for the CLI-level rows (resume, data-parallel ranks)."""
    from xlpeft.models import load_base

    made = needed_settings(method, load_base(str(base_dir))) if method == "fusion" else {}
    return [a for k, v in made.items() for a in ("--set", f"{k}={v}")]
