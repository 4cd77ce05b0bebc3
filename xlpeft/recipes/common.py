"""Pieces every training recipe shares: config resolution, tags, and publishing a module."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from xlpeft.config import TrainConfig, split_overrides
from xlpeft.io import Manifest, load_module, save_module
from xlpeft.registry import get_method


def resolve_configs(method: str, kind: str, sets: dict[str, Any], cli: dict[str, Any],
                    *extra_classes: type, train_defaults: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """(method config, TrainConfig, *extra configs) from --set overrides and explicit CLI flags (flags win).

    Unknown keys are reported against the union of all the classes' fields.
    """
    spec = get_method(method)
    routed = split_overrides(sets, spec.config_cls, TrainConfig, *extra_classes)
    method_over, train_over, extra_over = routed[0], routed[1], routed[2:]
    train_over = {**(train_defaults or {}), **train_over, **{k: v for k, v in cli.items() if v is not None}}
    defaults = getattr(spec.config_cls, "defaults_for", lambda _kind: {})(kind)
    extras = tuple(cls(**over) for cls, over in zip(extra_classes, extra_over, strict=True))
    return (spec.config_cls(**{**defaults, **method_over}), TrainConfig(**train_over), *extras)


def base_ref(base) -> dict[str, str]:
    return {"name": base.name, "fingerprint": base.fingerprint, "model_type": base.model.config.model_type}


def run_tags(kind: str, lang: str | None, task: str | None, method: str, base) -> dict[str, str]:
    return {
        "xlpeft.kind": kind, "xlpeft.lang": lang or "none", "xlpeft.task": task or "none", "xlpeft.method": method,
        "xlpeft.base": base.name, "xlpeft.base_fingerprint": base.fingerprint,
    }


def publish(tracker, out_dir: Path, manifest: Manifest, tensors: dict, registered_name: str,
            tags: dict[str, str], step: int) -> str:
    """Save the module atomically, verify it reads back, log it as artifacts, then register it.

    Registration comes last so the registry never points at a half-written module.
    """
    save_module(out_dir, manifest, tensors)
    load_module(out_dir)
    tracker.log_artifacts(out_dir, "module")
    tracker.log_metrics({"trainable_parameters": manifest.trainable_parameters}, step)
    return tracker.register(registered_name, "module", tags)


def count_parameters(tensors: dict[str, dict], extra: dict[str, Any], skip: tuple[str, ...] = ()) -> int:
    """Trainable parameters of a module: the method's own count if it gives one, else every saved element."""
    if "trainable_parameters" in extra:
        return int(extra.pop("trainable_parameters"))
    return sum(t.numel() for stem, s in tensors.items() if stem not in skip for t in s.values())


def config_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)
