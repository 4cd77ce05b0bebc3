"""A sparse fine-tuning as a value: per parameter, flat indices and the values added there.

theta = theta0 + delta, with delta non-zero at few entries (Ansell et al., ACL 2022). Deltas are
composable by addition: a language SFT and a task SFT are applied by summing them into the
weights, entries they share add up.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from xlpeft.errors import XlpeftError

INDICES, VALUES = "indices", "values"  # safetensors keys: "<param>.indices", "<param>.values"


@dataclass(frozen=True, eq=False)
class SparseDelta:
    """``{param_name: (indices, values)}``: 1-D int64 flat indices into the parameter, 1-D float values.

    Names are parameter paths in the model. A tied weight has several (the MLM decoder shares the
    word embeddings); a delta names it once, by its encoder name (see
    :func:`~xlpeft.methods.sft.trainable.maskable_parameters`), and applying one that names the
    same tensor twice is refused.
    """

    entries: Mapping[str, tuple[torch.Tensor, torch.Tensor]]

    def __post_init__(self) -> None:
        problems = []
        for name, (idx, vals) in self.entries.items():
            if idx.dim() != 1 or vals.dim() != 1 or len(idx) != len(vals):
                problems.append(f"{name}: indices {tuple(idx.shape)} and values {tuple(vals.shape)} should be 1-D of one length")
            if idx.dtype != torch.long:
                problems.append(f"{name}: indices should be int64, got {idx.dtype}")
            if not vals.is_floating_point():
                problems.append(f"{name}: values should be floating point, got {vals.dtype}")
        if problems:
            raise XlpeftError("malformed sparse delta: " + "; ".join(problems))

    @property
    def num_params(self) -> int:
        """Stored entries (K)."""
        return sum(len(idx) for idx, _ in self.entries.values())

    def counts(self) -> dict[str, int]:
        return {name: len(idx) for name, (idx, _) in self.entries.items()}

    # ---- application
    def _targets(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters this delta touches, after checking every entry fits (nothing is changed on error)."""
        params = dict(model.named_parameters(remove_duplicate=False))  # every alias of a tied weight
        problems = []
        named: dict[int, str] = {}
        for name, (idx, _) in self.entries.items():
            p = params.get(name)
            if p is None:
                problems.append(f"no parameter {name!r} in the model")
                continue
            if id(p) in named:
                problems.append(f"{name} and {named[id(p)]} are one tied tensor; it would be changed twice")
            named[id(p)] = name
            if not p.is_contiguous():
                problems.append(f"{name} is not contiguous")
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
                problems.append(f"{name}: indices span [{int(idx.min())}, {int(idx.max())}] but it has {p.numel()} entries")
            if not p.is_floating_point():
                problems.append(f"{name} is {p.dtype}, not floating point")
        if problems:
            raise XlpeftError(
                "sparse delta does not fit this model (trained on another base or architecture?): " + "; ".join(problems)
            )
        return {name: params[name] for name in self.entries}

    @torch.no_grad()
    def apply(self, model: nn.Module, scale: float = 1.0) -> None:
        """Add ``scale * delta`` to the model's weights in place (all entries are checked first).

        The values it overwrites are kept, so that :meth:`revert` restores them bit-exactly.

        Raises:
            XlpeftError: a parameter is missing, an index is out of range, or a dtype does not fit.
        """
        saved = {}
        for name, p in self._targets(model).items():
            idx, vals = self.entries[name]
            idx = idx.to(p.device)
            saved[name] = (idx, p.view(-1).index_select(0, idx))  # (K_i,) the values before
            p.view(-1).index_add_(0, idx, vals.to(device=p.device, dtype=p.dtype), alpha=scale)
        _APPLIED.setdefault(model, []).append(_Applied(self, scale, saved))

    @torch.no_grad()
    def revert(self, model: nn.Module) -> None:
        """Undo the latest :meth:`apply` of this delta to ``model``, bit-exactly.

        Deltas applied after it are taken off first (their kept values restored, newest first) and
        put back on afterwards, so reverting out of order leaves exactly what applying only the
        others would have (entries they share included); in reverse order it is a plain restore.

        Raises:
            XlpeftError: this delta is not applied to ``model``.
        """
        stack = _APPLIED.get(model, [])
        pos = next((i for i in range(len(stack) - 1, -1, -1) if stack[i].delta is self), None)
        if pos is None:
            raise XlpeftError("this sparse delta is not applied to this model; revert() undoes an apply()")
        above = stack[pos + 1:]
        params = dict(model.named_parameters(remove_duplicate=False))
        for record in reversed(stack[pos:]):
            for name, (idx, before) in record.saved.items():
                p = params[name]
                p.view(-1).index_copy_(0, idx.to(p.device), before.to(p.device))
        del stack[pos:]
        for record in above:
            record.delta.apply(model, record.scale)

    # ---- composition
    def __add__(self, other: SparseDelta) -> SparseDelta:
        """Sum of two deltas; where both hold an index, their values add."""
        if not isinstance(other, SparseDelta):
            return NotImplemented
        out = dict(self.entries)
        for name, (idx, vals) in other.entries.items():
            if name not in out:
                out[name] = (idx, vals)
                continue
            mine_idx, mine_vals = out[name]
            joined = torch.cat([mine_idx, idx])
            unique, inverse = torch.unique(joined, return_inverse=True)  # sorted
            dtype = torch.promote_types(mine_vals.dtype, vals.dtype)
            summed = torch.zeros(len(unique), dtype=dtype).index_add_(0, inverse, torch.cat([mine_vals, vals]).to(dtype))
            out[name] = (unique, summed)
        return SparseDelta(out)

    def __radd__(self, other: object) -> SparseDelta:
        if isinstance(other, int) and other == 0:  # so that sum([d1, d2, ...]) works
            return self
        return NotImplemented

    def overlap(self, other: SparseDelta) -> dict[str, int]:
        """Per parameter both deltas touch, how many indices they share."""
        return {
            name: int(torch.count_nonzero(torch.isin(idx, other.entries[name][0])))
            for name, (idx, _) in self.entries.items()
            if name in other.entries
        }

    # ---- serialisation (safetensors)
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (idx, vals) in self.entries.items():
            out[f"{name}.{INDICES}"] = idx.detach().cpu()
            out[f"{name}.{VALUES}"] = vals.detach().cpu()
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> SparseDelta:
        """Inverse of :meth:`to_tensors`; every parameter needs both ``.indices`` and ``.values``."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            name, _, part = key.rpartition(".")
            if part not in (INDICES, VALUES) or not name:
                raise XlpeftError(f"sparse delta key {key!r} should end in .{INDICES} or .{VALUES}")
            pairs.setdefault(name, {})[part] = tensor
        incomplete = sorted(n for n, pair in pairs.items() if len(pair) != 2)
        if incomplete:
            raise XlpeftError(f"sparse delta has indices without values or the reverse for {incomplete}")
        return cls({name: (pair[INDICES], pair[VALUES]) for name, pair in pairs.items()})


@dataclass(frozen=True, eq=False)
class _Applied:
    """One :meth:`SparseDelta.apply`: per parameter name, (flat indices, the values they held before)."""

    delta: SparseDelta
    scale: float
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]]


# model -> its applied deltas, oldest first; weak so that a dropped model frees them
_APPLIED: weakref.WeakKeyDictionary[nn.Module, list[_Applied]] = weakref.WeakKeyDictionary()
