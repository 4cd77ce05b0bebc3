"""Interop: read and write AdapterHub adapters and composable-sft sparse fine-tunings.

    xlpeft convert ./sw-adapter modules/lang-sw --from adapterhub --base xlmr
    xlpeft convert modules/lang-sw ./sw-adapter-ah --from xlpeft --to adapterhub
    xlpeft convert ./lang-sft-sw modules/lang-sw-sft --from composable-sft --base mbert
    xlpeft convert modules/lang-sw-sft ./sft-out --from xlpeft --to composable-sft --base mbert
    xlpeft convert ./peft-lora modules/lang-sw-lora --from peft --base xlmr
    xlpeft convert modules/lang-sw-lora ./peft-lora-out --from xlpeft --to peft

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

FORMATS = ("xlpeft", "adapterhub", "composable-sft", "peft")


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
        # torch words this "Unsupported global: GLOBAL os.system ..." (2.13 lower-cases it in places) and then
        # advises re-running with weights_only=False: never pass that advice on.
        text = str(exc)
        found = re.search(r"unsupported global[^\n]*?(?=\. |\n|$)", text, re.IGNORECASE)
        if found:  # the pickle would import and call something: never run it
            raise XlpeftError(
                f"{path} holds code ({found.group(0)[:160]}), not only tensors; xlpeft reads pickles only with "
                "torch.load(weights_only=True), refused it and ran nothing. Ask its author for a .safetensors "
                "file, or convert only checkpoints from a source you trust"
            ) from None
        operand = re.search(r"unsupported operand \d+", text, re.IGNORECASE)
        first = next((line.strip() for line in text.splitlines() if line.strip()), "not a pickle")
        if operand or "weights_only" in first or "will likely succeed" in first:  # never pass torch's unsafe advice on
            first = operand.group(0) if operand else "not a weights-only PyTorch pickle"
        raise XlpeftError(f"cannot read {path} as a weights-only PyTorch pickle ({first[:200]}); "
                          "is it a complete checkpoint?") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise XlpeftError(f"cannot read {path}: {first}; is it a complete PyTorch checkpoint?") from None


def read_json_object(path: Path, hint: str = "") -> dict:
    """A foreign format's JSON config as a dict; unreadable or not an object is one error (``hint`` ends it)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XlpeftError(f"cannot read {path}: {exc}{hint}") from None
    if not isinstance(data, dict):
        raise XlpeftError(f"{path} should hold a JSON object; got {type(data).__name__}")
    return data


def read_state_dict(src: Path, safe_name: str, bin_name: str, hint: str) -> dict[str, torch.Tensor]:
    """Tensors from ``src/safe_name`` (safetensors) or else ``src/bin_name`` (a weights-only pickle of tensors).

    ``hint`` finishes the error when neither file is there (e.g. "is it a complete peft adapter?").
    """
    from collections.abc import Mapping

    from safetensors.torch import load_file

    if (src / safe_name).is_file():
        try:
            return load_file(str(src / safe_name))
        except Exception as exc:  # safetensors raises its own error types
            raise XlpeftError(f"cannot read {src / safe_name}: {exc}") from None
    if (src / bin_name).is_file():
        state = load_pickled(src / bin_name)
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise XlpeftError(f"{src / bin_name} should hold a state dict of tensors")
        return dict(state)
    raise XlpeftError(f"{src} has neither {bin_name} nor {safe_name}; {hint}")


def check_output_dir(dst: str | Path, marker: str) -> Path:
    """Refuse to replace anything but an earlier output of the same kind (a directory holding ``marker``).

    The same policy as every command's ``--output`` (:func:`xlpeft.io.check_output_dir`): a mistyped
    DST (``.``, a home directory, a user's folder or file) is never wiped.
    """
    from xlpeft.io import check_output_dir as check

    return check(dst, marker, "an earlier output of this kind", label="DST")


def convert(src: str | Path, dst: str | Path, from_format: str, to_format: str = "xlpeft", base: Any = None,
            name: str | None = None, without_head: bool = False, safetensors: bool = False,
            layout: str = "diffs") -> Path:
    """Convert a module between xlpeft and a home library's format; returns ``dst``.

    Args:
        src: the source directory, or a hub id ``hf:ORG/REPO[@REVISION][:SUBDIR]`` (its snapshot in the
            Hugging Face cache, fetched unless ``HF_HUB_OFFLINE`` is set; see :mod:`xlpeft.hub`).
        dst: the directory to write (replaced if it exists).
        from_format: ``adapterhub``, ``composable-sft``, ``peft`` or ``xlpeft``.
        to_format: ``xlpeft`` (default), ``adapterhub``, ``composable-sft`` or ``peft``; one side must be xlpeft.
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
    if str(src).startswith("hf:") and not Path(src).is_dir():  # hf:ORG/REPO[@REVISION][:SUBDIR]: its cached snapshot
        from xlpeft.hub import hub_module, snapshot_dir

        ref, (src, _, _, layout) = str(src), snapshot_dir(str(src))
        if layout != from_format:
            raise XlpeftError(f"--from {from_format}: {ref} holds a {layout} module; pass --from {layout}")
        if layout == "xlpeft":  # a plain copy: the hub cache's files are symlinks into its blob store
            src = hub_module(ref).path
    elif not Path(src).is_dir():
        raise XlpeftError(f"SRC {src} is not a directory; give a module directory or a hub id hf:ORG/REPO[@REVISION]")
    if from_format == "xlpeft":  # no home library has new vocabulary rows beside a module: they would be lost
        from xlpeft.io import read_manifest
        from xlpeft.vocab import NewVocab

        vocab = NewVocab.from_extra(read_manifest(src).extra)  # the manifest alone: the exporter reads the tensors
        if vocab is not None:
            raise XlpeftError(f"{src} adds {len(vocab.tokens)} new tokens (train-lang --set new_tokens), which "
                              f"{to_format} cannot hold; exporting would drop them. Train the module without new_tokens "
                              "to export it")
    if from_format == "adapterhub":
        return import_adapterhub(src, dst, base, name=name, without_head=without_head)
    if from_format == "composable-sft":
        return import_composable_sft(src, dst, base, name=name, without_head=without_head)
    if from_format == "peft":
        from xlpeft.interop.peft import import_peft

        return import_peft(src, dst, base, name=name)
    if to_format == "peft":
        from xlpeft.interop.peft import export_peft

        return export_peft(src, dst, base=base, without_head=without_head)
    if to_format == "adapterhub":
        return export_adapterhub(src, dst, name=name, safetensors=safetensors)
    return export_composable_sft(src, dst, base, layout=layout)


__all__ = ["FORMATS", "check_output_dir", "convert", "load_pickled"]
