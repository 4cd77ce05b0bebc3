"""Composition: put a language module under a task module on a frozen base.

Adapters stack by hooks (language adapter below the task adapter; the language module's
invertible adapter on the embeddings), sparse deltas add into the weights
(θ0 + δ_lang + δ_task), and hybrids mix both (Pfeiffer et al. 2020; Ansell et al. 2022).
A composition is data (:class:`Composition`): which modules, in which order, how combined.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xlpeft.errors import XlpeftError
from xlpeft.io import LoadedModule, load_module
from xlpeft.registry import get_method

COMBINE = {"adapter": "stack", "sft": "sum"}
"""How each method combines with the modules below it."""


@dataclass
class Active:
    """Modules currently applied to a base; ``remove()`` restores the bare base exactly (reverse order)."""

    modules: list[LoadedModule] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        self.modules.clear()


def activate(base, modules: list[LoadedModule], force: bool = False) -> Active:
    """Apply ``modules`` (bottom first) to ``base`` after checking each was trained on this base."""
    active = Active()
    try:
        for module in modules:
            module.check_base(base.fingerprint, force=force)
            spec = get_method(module.manifest.method)
            active.handles.append(spec.activate(base, module))
            active.modules.append(module)
    except XlpeftError:
        active.remove()
        raise
    return active


@dataclass(frozen=True)
class Slot:
    """One module in a composition."""

    kind: str  # language | task
    method: str
    name: str  # lang code or task name
    source: str  # where it came from: a path or registry name@version
    combine: str  # stack | sum

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Composition:
    """Which modules, bottom first, and how each combines. Validated on creation."""

    slots: tuple[Slot, ...]
    base_fingerprint: str

    def __post_init__(self) -> None:
        kinds = [s.kind for s in self.slots]
        if not self.slots:
            raise XlpeftError("a composition needs at least one module")
        if kinds.count("task") > 1 or kinds.count("language") > 1:
            raise XlpeftError(f"a composition holds at most one language and one task module; got {kinds}")
        if "task" in kinds and kinds[-1] != "task":
            raise XlpeftError(f"the task module must sit on top of the language module; got order {kinds}")

    @property
    def task(self) -> Slot | None:
        return next((s for s in self.slots if s.kind == "task"), None)

    def to_dict(self) -> dict[str, Any]:
        return {"base_fingerprint": self.base_fingerprint, "slots": [s.to_dict() for s in self.slots]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Composition:
        return cls(tuple(Slot(**s) for s in data["slots"]), data["base_fingerprint"])

    def describe(self) -> str:
        return " + ".join(f"{s.kind}:{s.name}/{s.method}({s.combine})" for s in self.slots)


def resolve_module(ref: str | Path | LoadedModule, fingerprint: str | None = None) -> tuple[LoadedModule, str]:
    """A module from a directory, or from the registry as ``NAME`` or ``NAME@VERSION``."""
    from xlpeft import tracking

    if isinstance(ref, LoadedModule):
        return ref, str(ref.path)
    text = str(ref)
    if Path(text).is_dir():
        return load_module(text), text
    name, _, version = text.partition("@")
    if not name.startswith("xlpeft-"):
        raise XlpeftError(f"module {text!r} is neither a directory nor a registered name (xlpeft-lang-..., xlpeft-task-...)")
    if version:
        match = [v for v in tracking.list_versions(name) if v.version == version]
        if not match:
            raise XlpeftError(f"registered module {name!r} has no version {version}")
        path, reg = tracking.download(match[0])
    else:
        path, reg = tracking.find_module(name, fingerprint)
    return load_module(path), f"{reg.name}@{reg.version}"


def describe_modules(modules: list[tuple[LoadedModule, str]], fingerprint: str) -> Composition:
    slots = []
    for module, source in modules:
        m = module.manifest
        if m.kind not in ("language", "task"):
            raise XlpeftError(f"{module.path} is a {m.kind} artifact; compose takes language and task modules")
        combine = COMBINE.get(m.method)
        if combine is None:
            raise XlpeftError(f"{module.path}: method {m.method!r} cannot be composed (known: {', '.join(COMBINE)})")
        slots.append(Slot(m.kind, m.method, (m.lang if m.kind == "language" else m.task) or "?", source, combine))
    return Composition(tuple(slots), fingerprint)


def check_same_base(base, modules: list[LoadedModule]) -> None:
    """Refuse a module trained on another base, naming both fingerprints and the module."""
    for module in modules:
        theirs = module.manifest.base
        if theirs["fingerprint"] != base.fingerprint:
            raise XlpeftError(
                f"cannot compose {module.path}: it was trained on base {theirs.get('name')!r} "
                f"(fingerprint {theirs['fingerprint']}), but the base is {base.name!r} (fingerprint {base.fingerprint})"
            )


def target_model(base, task: LoadedModule | None) -> nn.Module:
    """A fresh Hugging Face model for the composition: MLM, or token/sequence classification with the task head."""
    if task is None:
        return copy.deepcopy(base.model)
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    labels = task.manifest.extra["labels"]
    head_kind = task.manifest.extra["head"]
    check_head(task, base.hidden_size)
    config = copy.deepcopy(base.model.config)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    auto = AutoModelForTokenClassification if head_kind == "token_classification" else AutoModelForSequenceClassification
    model = auto.from_config(config)
    encoder = model.get_submodule(base.arch.encoder)
    missing, unexpected = encoder.load_state_dict(base.encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise XlpeftError(f"base encoder does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    head = task.tensors["head"]
    with torch.no_grad():
        if head_kind == "token_classification":
            _copy_linear(model.get_submodule(base.arch.token_head), head, "classifier")
        else:
            dense, out = base.arch.seq_head
            _copy_linear(model.get_submodule(dense), head, "dense")
            _copy_linear(model.get_submodule(out), head, "classifier")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(next(base.model.parameters()).device)


def check_head(task: LoadedModule, hidden_size: int) -> None:
    """The saved head must fit the base's hidden size and the module's label list."""
    from xlpeft.methods.heads import build_head

    extra = task.manifest.extra
    if "head" not in task.tensors or "labels" not in extra or "head" not in extra:
        raise XlpeftError(f"task module {task.path} has no head (head.safetensors and labels); it is incomplete")
    expected = build_head(extra["head"], hidden_size, len(extra["labels"])).state_dict()
    got = task.tensors["head"]
    problems = [f"{k}: expected {tuple(v.shape)}, got {tuple(got[k].shape) if k in got else 'nothing'}"
                for k, v in expected.items() if k not in got or got[k].shape != v.shape]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    if problems:
        raise XlpeftError(f"task head in {task.path} does not fit a base of hidden size {hidden_size} with "
                          f"{len(extra['labels'])} labels: {'; '.join(problems)}")


def _copy_linear(target: nn.Linear, state: dict[str, torch.Tensor], prefix: str) -> None:
    target.weight.copy_(state[f"{prefix}.weight"])
    target.bias.copy_(state[f"{prefix}.bias"])


def compose(base, modules: list[str | Path | LoadedModule], force: bool = False) -> nn.Module:
    """Compose modules on a base into a Hugging Face model whose forward returns the usual outputs.

    Args:
        base: a :class:`~xlpeft.models.Base`, or anything :func:`~xlpeft.models.load_base` takes.
        modules: module directories or registry references (``xlpeft-lang-sw-adapter[@3]``), bottom first:
            the language module, then the task module.
        force: compose even if a module's base fingerprint differs (you know the weights are the same).

    Returns:
        ``*ForMaskedLM`` (language modules only), ``*ForTokenClassification`` or
        ``*ForSequenceClassification`` (a task module on top), in eval mode, with the composition
        at ``model.xlpeft_composition`` and the adapter weights as ``model.xlpeft_adapters``.

    Raises:
        XlpeftError: a module was trained on another base (both fingerprints named), or the order is invalid.
    """
    from xlpeft.models import load_base

    if isinstance(base, (str, Path)) and not modules and (Path(base) / COMPOSITION_FILE).is_file():
        return load_composed(base)
    if not isinstance(base, (str, Path)) and not hasattr(base, "fingerprint"):
        raise XlpeftError(f"base should be a Base or a name/path; got {type(base).__name__}")
    if isinstance(base, (str, Path)):
        base = load_base(str(base))
    resolved = [resolve_module(m, base.fingerprint) for m in modules]
    loaded = [m for m, _ in resolved]
    if not force:
        check_same_base(base, loaded)
    composition = describe_modules(resolved, base.fingerprint)
    task = loaded[-1] if composition.task is not None else None
    model = target_model(base, task)
    target = dataclasses.replace(base, model=model)
    active = activate(target, loaded, force=True)
    adapters = [h.module for h in active.handles if hasattr(h, "module")]
    model.add_module("xlpeft_adapters", nn.ModuleList(adapters))
    model.xlpeft_composition = composition
    model.xlpeft_active = active
    return model.eval()


def delta_overlap(lower: LoadedModule, upper: LoadedModule) -> dict[str, int]:
    """Shared indices between two sparse deltas, per transformer layer (``layer_03``), ``embeddings`` or ``other``."""
    from xlpeft.methods.sft import SparseDelta

    shared = SparseDelta.from_tensors(lower.tensors["delta"]).overlap(SparseDelta.from_tensors(upper.tensors["delta"]))
    per_layer: dict[str, int] = {}
    for name, count in shared.items():
        match = re.search(r"layer\.(\d+)\.", name)
        bucket = f"layer_{int(match.group(1)):02d}" if match else ("embeddings" if "embeddings" in name else "other")
        per_layer[bucket] = per_layer.get(bucket, 0) + count
    return dict(sorted(per_layer.items()))


COMPOSITION_FILE = "xlpeft_composition.json"


def save_composed(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a composed model so that :func:`compose` (or ``from_pretrained``) loads it back.

    Deltas are already merged into the weights, so with no adapter involved the directory is a
    plain transformers checkpoint. Adapters are written next to it as xlpeft module folders
    (``adapters/0``, ...) and re-hooked by :func:`load_composed`; ``from_pretrained`` alone
    would then give the model *without* adapters.
    """
    import json

    from xlpeft.io import save_module

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapters = model._modules.pop("xlpeft_adapters", None)
    try:
        model.save_pretrained(out_dir)
    finally:
        if adapters is not None:
            model.add_module("xlpeft_adapters", adapters)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    composition: Composition = model.xlpeft_composition
    active: Active = model.xlpeft_active
    adapter_dirs = []
    for i, (module, handle) in enumerate(zip(active.modules, active.handles, strict=True)):
        if not hasattr(handle, "module"):
            continue
        sub = out_dir / "adapters" / str(i)
        save_module(sub, module.manifest, {"adapter": handle.module.state_dict()})
        adapter_dirs.append(f"adapters/{i}")
    record = {"composition": composition.to_dict(), "adapters": adapter_dirs, "format_version": 1}
    (out_dir / COMPOSITION_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out_dir


def load_composed(path: str | Path) -> nn.Module:
    """Load a directory written by :func:`save_composed`: the checkpoint, then its adapters re-hooked."""
    import json

    from transformers import (
        AutoConfig,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    from xlpeft.models import Base, arch_for

    path = Path(path)
    record = json.loads((path / COMPOSITION_FILE).read_text(encoding="utf-8"))
    composition = Composition.from_dict(record["composition"])
    arch_name = (AutoConfig.from_pretrained(path).architectures or [""])[0]
    auto = (AutoModelForTokenClassification if arch_name.endswith("ForTokenClassification")
            else AutoModelForSequenceClassification if arch_name.endswith("ForSequenceClassification")
            else AutoModelForMaskedLM)
    model = auto.from_pretrained(path)
    for p in model.parameters():
        p.requires_grad_(False)
    base = Base(name=str(path), path=path, model=model, tokenizer=None, fingerprint=composition.base_fingerprint,
                arch=arch_for(model))
    adapters = [load_module(path / sub) for sub in record["adapters"]]
    active = activate(base, adapters, force=True)
    model.add_module("xlpeft_adapters", nn.ModuleList(h.module for h in active.handles))
    model.xlpeft_composition = composition
    model.xlpeft_active = active
    return model.eval()
