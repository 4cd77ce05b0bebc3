"""composable-sft sparse fine-tunings (``pytorch_diff.bin``) <-> xlpeft sft modules.

composable-sft (Ansell et al., ACL 2022; cambridgeltl/composable-sft ``src/sft/sft.py``) saves one
pickled dict, in one of two layouts:

* current: ``{"diffs": {param: encoding}, "abs": {param: dense tensor}}`` where an encoding is
  ``{"size", "index_steps", "values"}``: the entries' flat indices, taken with the **first**
  dimension varying fastest (column-major), sorted, stored as the first index then the gaps;
* earlier: ``{"body": {param: sparse COO tensor}, "head": {param: dense tensor}}``.

Either layout may hold either diff form; both are read. ``SFT.apply`` adds each diff to its
parameter and, with ``with_abs`` (the default), copies the dense values over theirs.

Mapping onto xlpeft: diffs become a :class:`~xlpeft.methods.sft.SparseDelta` (row-major flat
indices, as ``param.view(-1)`` numbers them). Dense values of base parameters (a language SFT's
MLM head) are folded into the delta as ``value - theta0`` over every entry, so that composing
gives composable-sft's ``apply`` to float rounding; they are listed in ``extra.dense_params`` and
written back as dense values on export. Dense values forming a task head (token classification
``classifier``, or the sequence-classification dense + output layers) become the module's head.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from xlpeft.errors import XlpeftError
from xlpeft.interop import check_output_dir, load_pickled
from xlpeft.io import MANIFEST, Manifest, load_module, save_module
from xlpeft.methods.sft import SFTConfig, SparseDelta

FILE = "pytorch_diff.bin"
LAYOUTS = ("diffs", "body")


# ---------------------------------------------------------------- index orders
def _strides(size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row-major strides, column-major strides) of a shape, as int64 tensors."""
    sizes = torch.tensor(size, dtype=torch.long)
    ones = torch.ones(1, dtype=torch.long)
    row = torch.cat([torch.flip(torch.cumprod(torch.flip(sizes[1:], [0]), 0), [0]), ones]) if len(size) > 1 else ones
    col = torch.cat([ones, torch.cumprod(sizes[:-1], 0)]) if len(size) > 1 else ones
    return row, col


def column_to_row(flat: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """composable-sft's flat indices (first dimension fastest) -> ``view(-1)`` indices (last dimension fastest)."""
    row, col = _strides(size)
    coords = (flat[None, :] // col[:, None]) % torch.tensor(size, dtype=torch.long)[:, None]  # (ndim, K)
    return (coords * row[:, None]).sum(0)


def row_to_column(flat: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`column_to_row`."""
    row, col = _strides(size)
    coords = (flat[None, :] // row[:, None]) % torch.tensor(size, dtype=torch.long)[:, None]
    return (coords * col[:, None]).sum(0)


# ---------------------------------------------------------------- reading
def _diff_entry(name: str, diff: Any) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    """One stored diff -> (shape, row-major flat indices, values)."""
    if isinstance(diff, torch.Tensor) and diff.layout == torch.sparse_coo:
        size = tuple(diff.shape)
        coords = diff._indices()  # (ndim, nnz), as stored: coalesce() neither checks nor fixes the range
        if coords.shape[0] != len(size) or diff._values().dim() != 1:
            raise XlpeftError(f"{name}: a sparse diff of shape {size} should hold {len(size)}-D indices and 1-D values; "
                              f"got indices {tuple(coords.shape)} and values {tuple(diff._values().shape)}")
        for dim, extent in enumerate(size):
            if coords.shape[1] and (int(coords[dim].min()) < 0 or int(coords[dim].max()) >= extent):
                raise XlpeftError(f"{name}: sparse indices of dimension {dim} span [{int(coords[dim].min())}, "
                                  f"{int(coords[dim].max())}] outside a {size} tensor; the file is corrupt or not "
                                  "for this parameter, re-save it with composable-sft")
        diff = diff.coalesce()
        row, _ = _strides(size)
        return size, (diff.indices() * row[:, None]).sum(0), diff.values()
    if isinstance(diff, torch.Tensor):  # a dense difference: keep its non-zero entries
        idx = torch.nonzero(diff.reshape(-1)).reshape(-1)
        return tuple(diff.shape), idx, diff.reshape(-1)[idx]
    if isinstance(diff, Mapping) and {"size", "index_steps", "values"} <= set(diff):
        size = tuple(int(s) for s in diff["size"])
        steps = torch.tensor([int(s) for s in diff["index_steps"]], dtype=torch.long)
        values = diff["values"]
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or len(values) != len(steps):
            raise XlpeftError(f"{name}: {len(steps)} index steps but values {getattr(values, 'shape', values)!r}")
        flat = torch.cumsum(steps, 0)
        numel = int(torch.tensor(size).prod()) if size else 1
        if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= numel):
            raise XlpeftError(f"{name}: indices span [{int(flat.min())}, {int(flat.max())}] outside a {size} tensor")
        return size, column_to_row(flat, size), values
    raise XlpeftError(f"{name}: a diff should be a sparse tensor or a size/index_steps/values encoding; got {type(diff).__name__}")


def read_sft(src: str | Path) -> tuple[dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]], dict[str, torch.Tensor], str]:
    """Read ``src/pytorch_diff.bin`` -> (diffs ``{name: (shape, row-major indices, values)}``, dense values, layout).

    Raises:
        XlpeftError: no such file, a pickle holding more than tensors, numbers and containers, or a malformed entry.
    """
    path = Path(src) / FILE
    if not path.is_file():
        raise XlpeftError(f"{Path(src)} has no {FILE}; is it a composable-sft SFT directory?")
    payload = load_pickled(path, numpy_scalars=True)
    if not isinstance(payload, Mapping) or not ({"diffs", "body"} & set(payload)):
        keys = sorted(payload) if isinstance(payload, Mapping) else type(payload).__name__
        raise XlpeftError(f"{path} should hold a dict with 'diffs' (+ 'abs') or 'body' (+ 'head'); found {keys}")
    layout = "diffs" if "diffs" in payload else "body"
    body = payload.get(layout) or {}
    dense = dict(payload.get("abs" if layout == "diffs" else "head") or {})
    try:
        diffs = {name: _diff_entry(name, d) for name, d in body.items()}
    except XlpeftError as exc:
        raise XlpeftError(f"{path}: {exc}") from None
    both = sorted(set(diffs) & set(dense))
    if both:
        raise XlpeftError(f"{path} holds both a difference and dense values for {both}")
    bad = sorted(n for n, v in dense.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise XlpeftError(f"{path}: dense entries should be tensors; not so for {bad}")
    return diffs, dense, layout


def _head_names(arch) -> dict[str, dict[str, str]]:
    """xlpeft head kind -> {parameter name in a transformers task model: key in xlpeft's head state dict}."""
    dense, out = arch.seq_head
    return {
        "sequence_classification": {f"{dense}.{k}": f"dense.{k}" for k in ("weight", "bias")}
        | {f"{out}.{k}": f"classifier.{k}" for k in ("weight", "bias")},
        "token_classification": {f"{arch.token_head}.{k}": f"classifier.{k}" for k in ("weight", "bias")},
    }


def _labels(src: Path, num_labels: int) -> list[str]:
    """Label names from a transformers ``config.json`` next to the SFT, else ``LABEL_i``."""
    try:
        id2label = json.loads((src / "config.json").read_text(encoding="utf-8")).get("id2label") or {}
        labels = [id2label[str(i)] for i in range(num_labels)]
    except (OSError, ValueError, KeyError, AttributeError):
        labels = []
    return labels or [f"LABEL_{i}" for i in range(num_labels)]


def import_composable_sft(src: str | Path, dst: str | Path, base: Any, name: str | None = None,
                          without_head: bool = False) -> Path:
    """Convert a composable-sft SFT directory into an xlpeft sft module at ``dst``.

    Args:
        src: the directory holding ``pytorch_diff.bin``.
        dst: the module directory to write.
        base: the base the SFT was trained on (alias, hub id, directory or loaded Base).
        name: language code / task name to record [default: the source folder's name].
        without_head: leave out the dense values, as composable-sft's ``apply(with_abs=False)``;
            use it for a language SFT that will sit under a task module (its MLM head is not there).

    Raises:
        XlpeftError: a parameter the base lacks or with another shape, or dense values that are
            neither base parameters nor a task head xlpeft knows (all listed).
    """
    from xlpeft.models import load_base

    src, dst = Path(src), check_output_dir(dst, MANIFEST)
    diffs, dense, layout = read_sft(src)
    base = base if hasattr(base, "fingerprint") else load_base(str(base))
    params = dict(base.model.named_parameters(remove_duplicate=False))
    if without_head:
        dense = {}
    heads = _head_names(base.arch)
    head_kind = next((k for k, names in heads.items() if set(names) <= set(dense)), None)
    head_state = {heads[head_kind][n]: dense.pop(n).detach().clone() for n in heads[head_kind]} if head_kind else {}
    problems = [f"{n}: not a parameter of base {base.name!r}" for n in list(diffs) + list(dense) if n not in params]
    problems += [f"{n}: shape {tuple(shape)} but the base has {tuple(params[n].shape)}"
                 for n, (shape, _, _) in diffs.items() if n in params and tuple(params[n].shape) != tuple(shape)]
    problems += [f"{n}: dense shape {tuple(v.shape)} but the base has {tuple(params[n].shape)}"
                 for n, v in dense.items() if n in params and params[n].shape != v.shape]
    owner = {id(params[n]): n for n in diffs if n in params}
    problems += [f"{n}: dense values for the tensor the diff of {owner[id(params[n])]} changes (tied weights)"
                 for n in dense if n in params and id(params[n]) in owner]
    if problems:
        hint = ("; a sequence-classification SFT on BERT also fine-tunes the pooler, which xlpeft's masked-LM base "
                "does not hold" if any(".pooler." in p for p in problems) else "")
        raise XlpeftError(f"{src} does not fit base {base.name!r}: " + "; ".join(problems[:8]) + hint)

    entries = {n: (idx.to(torch.long), vals.detach().clone()) for n, (_, idx, vals) in diffs.items() if len(idx)}
    for n, value in dense.items():  # theta0 + (value - theta0) = value, to float rounding
        theta0 = params[n].detach().reshape(-1).to(value.dtype)
        entries[n] = (torch.arange(theta0.numel()), value.detach().reshape(-1) - theta0)
    delta = SparseDelta(entries)
    kind = "task" if head_kind else "language"
    extra: dict[str, Any] = {
        "imported": {"format": "composable-sft", "source": str(src), "layout": layout},
        "dense_params": sorted(dense), "per_tensor_counts": delta.counts(),
    }
    tensors: dict[str, dict[str, torch.Tensor]] = {"delta": delta.to_tensors()}
    if head_kind:
        tensors["head"] = head_state
        extra.update(labels=_labels(src, head_state["classifier.weight"].shape[0]), head=head_kind, head_dropout=0.1)
    label = name or src.name
    manifest = Manifest(
        kind=kind, method="sft",
        base={"name": base.name, "fingerprint": base.fingerprint, "model_type": base.model.config.model_type},
        config=asdict(SFTConfig(num_params=max(1, delta.num_params))),
        lang=label if kind == "language" else None, task=label if kind == "task" else None,
        trainable_parameters=delta.num_params + sum(t.numel() for t in head_state.values()), extra=extra,
    )
    return save_module(dst, manifest, tensors)


# ---------------------------------------------------------------- writing
def _encode(flat_row: torch.Tensor, values: torch.Tensor, size: tuple[int, ...]) -> dict[str, Any]:
    """Row-major indices + values -> composable-sft's encoding (column-major, sorted, first index then gaps)."""
    flat = row_to_column(flat_row, size)
    order = torch.argsort(flat, stable=True)
    flat = flat[order]
    steps = torch.cat([flat[:1], flat[1:] - flat[:-1]]).tolist()  # Python ints: no numpy objects in the pickle
    return {"size": torch.Size(size), "index_steps": steps, "values": values[order].contiguous()}


def export_composable_sft(src: str | Path, dst: str | Path, base: Any, layout: str = "diffs") -> Path:
    """Write an xlpeft sft module as a composable-sft ``pytorch_diff.bin`` that its ``SFT(dir)`` loads.

    Args:
        src: an xlpeft sft module directory.
        dst: the directory to write (replaced if it exists).
        base: the module's base: composable-sft stores each parameter's shape, and dense values
            (folded into the delta on import) are written back as ``theta0 + delta``.
        layout: ``diffs`` (current composable-sft) or ``body`` (earlier releases, sparse COO tensors).

    Raises:
        XlpeftError: not an sft module, no base given or another base, an unknown layout.
    """
    from xlpeft.models import load_base

    if layout not in LAYOUTS:
        raise XlpeftError(f"layout should be one of {', '.join(LAYOUTS)}; got {layout!r}")
    dst = check_output_dir(dst, FILE)
    module = load_module(src)
    m = module.manifest
    if m.method != "sft":
        raise XlpeftError(f"{src} is a {m.method!r} module; composable-sft takes sparse fine-tunings (export adapters to adapterhub)")
    if base is None:
        raise XlpeftError("exporting to composable-sft needs --base: its files store each parameter's shape")
    base = base if hasattr(base, "fingerprint") else load_base(str(base))
    module.check_base(base.fingerprint)
    params = dict(base.model.named_parameters(remove_duplicate=False))
    delta = SparseDelta.from_tensors(module.tensors["delta"])
    dense_names = set(m.extra.get("dense_params") or [])
    diffs: dict[str, Any] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, (idx, vals) in delta.entries.items():
        if name not in params:
            raise XlpeftError(f"{src}: the delta names {name!r}, which base {base.name!r} lacks")
        p = params[name].detach()
        if name in dense_names:
            dense[name] = p.reshape(-1).clone().index_add_(0, idx, vals.to(p.dtype)).view_as(p)
        elif layout == "diffs":
            diffs[name] = _encode(idx, vals, tuple(p.shape))
        else:
            coords = torch.stack(torch.unravel_index(idx, tuple(p.shape)))
            diffs[name] = torch.sparse_coo_tensor(coords, vals, size=p.shape, check_invariants=True).coalesce()
    if "head" in module.tensors and m.extra.get("head"):
        names = {v: k for k, v in _head_names(base.arch)[m.extra["head"]].items()}
        dense.update({names[k]: v.detach().clone() for k, v in module.tensors["head"].items()})
    payload = {"diffs": diffs, "abs": dense} if layout == "diffs" else {"body": diffs, **({"head": dense} if dense else {})}
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    torch.save(payload, dst / FILE)  # composable-sft's own format: a pickled dict
    return dst
