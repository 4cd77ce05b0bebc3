"""Merging deltas into one module: weighted sum, task arithmetic and TIES-merging.

A sparse delta (LT-SFT, SpIEL) and a LoRA module are both changes to the base's weights, so
several of them can be merged into a single delta (and a single, cheaper module) instead of being
summed at composition time:

* ``linear``: δ = λ Σ_i w_i δ_i, weights defaulting to 1/n (an average, a "model soup");
* ``task_arithmetic`` (Ilharco et al. 2023, "Editing Models with Task Arithmetic"): the same sum
  with weights defaulting to 1 and the scale λ (the paper picks λ on held-out validation data;
  xlpeft never tunes it for you);
* ``ties`` (Yadav et al. 2023, "TIES-Merging"): trim each delta to its largest-magnitude entries
  (``density`` of each weight tensor, 0.2 in the paper), elect a sign per entry (the sign of the
  weighted sum), and average only the entries that agree with it; then scale by λ.

Every merge is computed on the union of the inputs' entries, per weight tensor, so it is exact
and deterministic. LoRA modules that adapt the same weights merge by ``linear`` /
``task_arithmetic`` into a LoRA module of rank Σ r_i (B and A concatenated: B'A' = Σ w_i s_i B_i A_i,
exactly); every other case gives an ``sft`` module holding the merged sparse delta (a LoRA's
delta is dense over the weights it adapts). Task modules also merge their heads, averaged with
the normalised weights; their labels must agree. Methods declare how they take part
(``MethodSpec.weight_delta`` / ``merge_own`` / ``delta_carrier``, :mod:`xlpeft.methods.deltas`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from xlpeft.config import check_fields
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.io import LoadedModule, Manifest
from xlpeft.registry import get_method, method_names

MERGE_METHODS = ("linear", "task_arithmetic", "ties")


@dataclass(frozen=True)
class MergeConfig:
    """How modules are merged; defaults from the papers (TIES: density 0.2, λ 1)."""

    method: str = field(default="linear", metadata={
        "help": "linear (weighted average), task_arithmetic (Ilharco et al. 2023), ties (Yadav et al. 2023)",
        "choices": MERGE_METHODS})
    weights: tuple[float, ...] | None = field(default=None, metadata={
        "help": "one weight per module, in order (None: 1/n for linear, 1 for task_arithmetic and ties)"})
    scale: float = field(default=1.0, metadata={"help": "λ, multiplies the merged delta", "gt": 0.0})
    density: float = field(default=0.2, metadata={
        "help": "ties: fraction of each weight tensor's entries a delta keeps after trimming (Yadav et al. 2023: 0.2)",
        "gt": 0.0, "max": 1.0})

    def __post_init__(self) -> None:
        extra = []
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            object.__setattr__(self, "weights", weights)
            if not all(math.isfinite(w) for w in weights):
                extra.append(f"`weights` should be finite numbers; got {list(weights)}")
        if not math.isfinite(self.scale):
            extra.append(f"`scale` should be a finite number; got {self.scale}")
        check_fields(self, extra=extra)

    def weights_for(self, n: int) -> list[float]:
        """The weight of each of ``n`` modules: the configured ones, or the method's default."""
        if self.weights is None:
            return [1.0 / n if self.method == "linear" else 1.0] * n
        if len(self.weights) != n:
            raise ConfigError(f"--weights gives {len(self.weights)} weight(s) for {n} modules; give one per module, "
                              "in the order of the modules")
        return list(self.weights)


# ---- the merge of sparse deltas (the arithmetic, on the union of entries)


def _union(deltas: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (U,), values (n, U)): every delta's values at the union of their indices for ``name``, 0 where absent."""
    present = [d[name] for d in deltas if name in d]
    dtype = present[0][1].dtype
    for _, vals in present[1:]:
        dtype = torch.promote_types(dtype, vals.dtype)
    union = torch.unique(torch.cat([idx for idx, _ in present]))  # (U,) sorted
    values = torch.zeros(len(deltas), len(union), dtype=dtype)  # (n, U)
    for i, d in enumerate(deltas):
        if name in d:
            idx, vals = d[name]
            values[i, torch.searchsorted(union, idx)] = vals.to(dtype)
    return union, values


def _trim(values: torch.Tensor, keep: int) -> torch.Tensor:
    """``values`` (n, U) with each row's entries outside its ``keep`` largest magnitudes set to 0 (ties broken by position)."""
    if keep >= values.shape[1]:
        return values
    order = torch.sort(values.abs(), dim=1, descending=True, stable=True).indices[:, :keep]  # (n, keep)
    mask = torch.zeros_like(values, dtype=torch.bool).scatter_(1, order, True)
    return values * mask


def merge_entries(deltas: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], config: MergeConfig,
                  sizes: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Merge sparse deltas given as ``{param: (indices, values)}``; ``sizes``: each parameter's number of entries.

    Returns the merged delta in the same form, without the entries the merge leaves at zero.
    """
    weights = torch.tensor(config.weights_for(len(deltas)), dtype=torch.float64)  # (n,)
    names = sorted({name for d in deltas for name in d})
    out = {}
    for name in names:
        union, values = _union(deltas, name)  # (U,), (n, U)
        w = weights.to(values.dtype).unsqueeze(1)  # (n, 1)
        if config.method == "ties":
            keep = max(1, math.ceil(config.density * sizes[name]))
            weighted = _trim(values, keep) * w  # (n, U)
            elected = torch.sign(weighted.sum(0))  # (U,) the sign of the total mass
            agree = (torch.sign(weighted) == elected) & (weighted != 0)  # (n, U)
            merged = (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)  # (U,) mean of the agreeing values
            kept = agree.any(0)
        else:
            merged = (values * w).sum(0)  # (U,)
            kept = torch.ones_like(merged, dtype=torch.bool)
        merged = merged * config.scale
        out[name] = (union[kept], merged[kept])
    return out


# ---- modules as deltas


def sparse_entries(module: LoadedModule, base) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A module's change to the base's weights as ``{param: (flat indices, values)}`` (``MethodSpec.weight_delta``).

    Raises:
        XlpeftError: a module that is not a weight delta (adapters, prefixes, (IA)³ run beside the weights), or DoRA.
    """
    spec = get_method(module.manifest.method)
    if spec.weight_delta is None:
        raise XlpeftError(f"{module.path} is a {spec.name} module; merging works on weight deltas "
                          f"({', '.join(delta_methods())}). Modules that run beside the weights compose instead: "
                          "stack them with xlpeft compose")
    return spec.weight_delta(base, module)


def delta_methods() -> list[str]:
    """The registered methods whose modules are weight deltas (and so merge)."""
    return [n for n in method_names() if get_method(n).weight_delta is not None]


def carrier():
    """The method whose module holds a merged sparse delta (``MethodSpec.delta_carrier``: sft)."""
    found = [get_method(n) for n in method_names() if get_method(n).delta_carrier is not None]
    if not found:
        raise XlpeftError("no registered method can hold a merged delta (MethodSpec.delta_carrier); register sft")
    return found[0]


def merge_heads(modules: list[LoadedModule], weights: list[float]) -> dict[str, torch.Tensor]:
    """The task heads averaged with the normalised weights (the merged encoder change shares one head).

    Raises:
        XlpeftError: the modules predict different labels or have heads of different shapes.
    """
    first = modules[0].manifest.extra
    for m in modules[1:]:
        if (m.manifest.extra.get("labels"), m.manifest.extra.get("head")) != (first.get("labels"), first.get("head")):
            raise XlpeftError(f"task modules {modules[0].path} and {m.path} predict different labels or use different "
                              "heads; only task modules of one task pack merge")
    total = sum(weights)
    if total == 0:
        raise XlpeftError("the weights sum to 0, so the task heads cannot be averaged; give weights with a non-zero sum")
    heads = [m.tensors["head"] for m in modules]
    if any(set(h) != set(heads[0]) or any(h[k].shape != heads[0][k].shape for k in h) for h in heads):
        raise XlpeftError("the task modules' heads have different shapes; they were trained on different bases")
    return {k: sum(h[k].double() * (w / total) for h, w in zip(heads, weights, strict=True)).to(heads[0][k].dtype)
            for k in heads[0]}


def check_mergeable(modules: list[LoadedModule]) -> None:
    """At least two delta modules of one kind, one base and (task modules) one task, none adding new tokens.

    Raises:
        XlpeftError: naming the module that does not fit.
    """
    if len(modules) < 2:
        raise XlpeftError(f"merging needs at least two modules; got {len(modules)}")
    from xlpeft.vocab import new_vocab_of

    first = modules[0].manifest
    for m in modules:
        if new_vocab_of(m) is not None:  # the rows are not a weight delta: merging would drop them
            raise XlpeftError(f"{m.path} adds new tokens (train-lang --set new_tokens); their embedding rows are not a "
                              "change to the base's weights and cannot be merged: merge modules without new_tokens")
        if get_method(m.manifest.method).weight_delta is None:
            sparse_entries(m, None)  # raises the error that names the method
        if m.manifest.kind != first.kind:
            raise XlpeftError(f"{m.path} is a {m.manifest.kind} module but {modules[0].path} is a {first.kind} "
                              "module; merge modules of one kind")
        if m.manifest.base["fingerprint"] != first.base["fingerprint"]:
            raise XlpeftError(f"{m.path} was trained on base {m.manifest.base.get('name')} "
                              f"({m.manifest.base['fingerprint']}), {modules[0].path} on {first.base.get('name')} "
                              f"({first.base['fingerprint']}); deltas of different weights do not merge")
        if first.kind == "task" and m.manifest.task != first.task:
            raise XlpeftError(f"{m.path} is a {m.manifest.task} module, {modules[0].path} a {first.task} module; "
                              "merge task modules of one task")


def merge_modules(modules: list[LoadedModule], base, config: MergeConfig,
                  name: str) -> tuple[Manifest, dict[str, dict[str, torch.Tensor]]]:
    """The merged module's manifest and tensors (not yet saved); ``name``: its language or task.

    Raises:
        XlpeftError: modules that cannot be merged (see :func:`check_mergeable`).
    """
    check_mergeable(modules)
    weights = config.weights_for(len(modules))
    first = modules[0].manifest
    methods = {m.manifest.method for m in modules}
    own = None
    if len(methods) == 1 and config.method != "ties":  # TIES trims entries: its result is sparse
        spec = get_method(first.method)
        own = spec.merge_own(modules, weights, config.scale) if spec.merge_own is not None else None
    if own is not None:
        method, (method_config, tensors) = first.method, own
        count = sum(t.numel() for state in tensors.values() for t in state.values())
    else:
        holder = carrier()
        sizes = {n: p.numel() for n, p in base.model.named_parameters(remove_duplicate=False)}
        merged = merge_entries([sparse_entries(m, base) for m in modules], config, sizes)
        method, (method_config, tensors) = holder.name, holder.delta_carrier(merged, modules)
        count = sum(len(idx) for idx, _ in merged.values())
    extra: dict[str, Any] = {}
    if first.kind == "task":
        tensors["head"] = merge_heads(modules, weights)
        extra = {k: v for k, v in first.extra.items() if k in ("labels", "head", "head_dropout", "lang_module")}
        if any(m.manifest.extra.get("lang_module") != first.extra.get("lang_module") for m in modules):
            extra.pop("lang_module", None)  # trained over different language modules: no single baseline
        count += sum(t.numel() for t in tensors["head"].values())
    extra["merged_from"] = [{"path": str(m.path), "method": m.manifest.method, "lang": m.manifest.lang,
                             "task": m.manifest.task, "weight": w} for m, w in zip(modules, weights, strict=True)]
    manifest = Manifest(kind=first.kind, method=method, base=dict(first.base), config=method_config,
                        lang=name if first.kind == "language" else "+".join(dict.fromkeys(
                            m.manifest.lang for m in modules if m.manifest.lang)) or None,
                        task=first.task if first.kind == "task" else None, trainable_parameters=count,
                        training={"merge": {**asdict(config), "weights": weights}}, extra=extra)
    return manifest, tensors
