"""Interop: read and write AdapterHub adapters and composable-sft sparse fine-tunings.

    xlpeft convert ./sw-adapter modules/lang-sw --from adapterhub --base xlmr
    xlpeft convert modules/lang-sw ./sw-adapter-ah --from xlpeft --to adapterhub
    xlpeft convert ./lang-sft-sw modules/lang-sw-sft --from composable-sft --base mbert
    xlpeft convert modules/lang-sw-sft ./sft-out --from xlpeft --to composable-sft --base mbert

Imports produce ordinary xlpeft module directories (manifest + safetensors) recording the base
they were checked against, so :func:`xlpeft.compose` uses them like trained ones. Exports write
the home library's own files. Foreign checkpoints are pickles: they are read only with
``torch.load(weights_only=True)`` (:func:`load_pickled`), which builds tensors and plain
containers and refuses any other object, so a checkpoint cannot run code.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from xlpeft.errors import XlpeftError

FORMATS = ("xlpeft", "adapterhub", "composable-sft")


def _numpy_scalar_globals() -> list:
    """numpy's scalar reconstructor and dtypes, under the names numpy 1.x and 2.x pickle them.

    composable-sft stores the first index step of each delta as a numpy int64; unpickling one
    calls ``numpy.core.multiarray.scalar(dtype, bytes)``, which only builds a number.
    """
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with transformers
        return []
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed: list = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    allowed += [getattr(np.dtypes, n) for n in ("Int64DType", "Int32DType", "Float32DType", "Float64DType")
                if hasattr(np, "dtypes")]
    return allowed


def load_pickled(path: Path, numpy_scalars: bool = False) -> Any:
    """Read a PyTorch pickle with ``torch.load(weights_only=True)`` only.

    Args:
        path: the ``.bin`` file.
        numpy_scalars: also allow numpy scalars (composable-sft's index encoding holds one).

    Raises:
        XlpeftError: the file holds anything but tensors and plain containers (a pickle that
            would import or call other code is refused, never executed), or it cannot be read.
    """
    path = Path(path)
    try:
        if numpy_scalars:
            with torch.serialization.safe_globals(_numpy_scalar_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported [^\n]*?(?=\. |\n|$)", str(exc))
        reason = found.group(0) if found else (str(exc).strip().splitlines() or ["not a pickle"])[0]
        if reason.startswith("Unsupported global"):  # the pickle would import and call something: never run it
            raise XlpeftError(
                f"{path} holds Python objects besides tensors and plain containers ({reason}); "
                "xlpeft reads pickles only with torch.load(weights_only=True) and refuses this one"
            ) from None
        raise XlpeftError(f"cannot read {path} as a weights-only PyTorch pickle ({reason[:200]}); "
                          "is it a complete checkpoint?") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise XlpeftError(f"cannot read {path}: {first}; is it a complete PyTorch checkpoint?") from None


def check_output_dir(dst: str | Path, marker: str) -> Path:
    """Refuse to replace a non-empty directory unless it holds ``marker`` (it is an earlier output of the same kind).

    Writing a module or an export replaces ``dst`` as a whole; this keeps a mistyped DST (``.``,
    a home directory) from being wiped.
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / marker).is_file())):
        raise XlpeftError(f"{dst} exists and is not an earlier output (no {marker} in it); choose a new directory")
    return dst


def convert(src: str | Path, dst: str | Path, from_format: str, to_format: str = "xlpeft", base: Any = None,
            name: str | None = None, without_head: bool = False, safetensors: bool = False,
            layout: str = "diffs") -> Path:
    """Convert a module between xlpeft and a home library's format; returns ``dst``.

    Args:
        src: the source directory.
        dst: the directory to write (replaced if it exists).
        from_format: ``adapterhub``, ``composable-sft`` or ``xlpeft``.
        to_format: ``xlpeft`` (default), ``adapterhub`` or ``composable-sft``; one side must be xlpeft.
        base: the base the module belongs to (alias, hub id, directory or a loaded
            :class:`~xlpeft.models.Base`). Needed to import (xlpeft modules record their base) and to
            export to composable-sft (its files store parameter shapes and dense head values).
        name: language code or task name to record (import) or adapter name to write (export to AdapterHub).
        without_head: AdapterHub: ignore the prediction head; composable-sft: leave out the dense
            values, like its ``apply(with_abs=False)`` (for a language SFT composed under a task module).
        safetensors: AdapterHub export: write ``adapter.safetensors`` (load with
            ``use_safetensors=True``) instead of ``pytorch_adapter.bin``.
        layout: composable-sft export: ``diffs`` (current ``{"diffs", "abs"}`` with index encodings)
            or ``body`` (earlier ``{"body", "head"}`` with sparse COO tensors).

    Raises:
        XlpeftError: an unsupported direction, a missing base, or anything the format readers refuse.
    """
    from xlpeft.interop.adapterhub import export_adapterhub, import_adapterhub
    from xlpeft.interop.composable_sft import export_composable_sft, import_composable_sft

    for label, fmt in (("--from", from_format), ("--to", to_format)):
        if fmt not in FORMATS:
            raise XlpeftError(f"{label} should be one of {', '.join(FORMATS)}; got {fmt!r}")
    if (from_format == "xlpeft") == (to_format == "xlpeft"):
        raise XlpeftError(
            f"convert goes between xlpeft and a foreign format; got --from {from_format} --to {to_format} "
            "(to move between AdapterHub and composable-sft, convert to xlpeft first)"
        )
    if to_format == "xlpeft" and base is None:
        raise XlpeftError("importing needs --base: xlpeft modules record the base they belong to and are checked against it")
    if from_format == "adapterhub":
        return import_adapterhub(src, dst, base, name=name, without_head=without_head)
    if from_format == "composable-sft":
        return import_composable_sft(src, dst, base, name=name, without_head=without_head)
    if to_format == "adapterhub":
        return export_adapterhub(src, dst, name=name, safetensors=safetensors)
    return export_composable_sft(src, dst, base, layout=layout)


__all__ = ["FORMATS", "check_output_dir", "convert", "load_pickled"]
