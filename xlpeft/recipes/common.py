"""Orchestration every training recipe shares: configs from ``--set``, run tags, the base on this rank's device.

The library pieces recipes drive live below them: the loop, phases and checkpoints in
:mod:`xlpeft.training`, the run's life in MLflow (resume, open, publish) in :mod:`xlpeft.tracking.lifecycle`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

from xlpeft import tracking
from xlpeft.config import KIND_TRAIN_DEFAULTS, TrainConfig, split_overrides
from xlpeft.distributed import local_device
from xlpeft.models import Base, load_base
from xlpeft.registry import get_method


def resolve_configs(method: str, kind: str, sets: dict[str, Any], *extra_classes: type) -> tuple[Any, ...]:
    """(method config, TrainConfig, *extra configs) from ``--set`` overrides (the CLI's flags arrive as keys too).

    Precedence, lowest first: TrainConfig's own defaults, the kind's ``KIND_TRAIN_DEFAULTS`` (task
    modules: shorter sequences), the method's per-kind ``spec.train_defaults(kind)`` (e.g. LT-SFT's
    lr 5e-5), ``--set``. Method fields: the dataclass defaults, ``spec.defaults(kind)``, ``--set``; ``spec.dropped_by`` names
    per-kind defaults that an explicit training key replaces (LT-SFT's task epochs give way to an
    explicit ``max_steps``). Unknown keys are reported against the union of all the classes' fields.
    """
    spec = get_method(method)
    routed = split_overrides(sets, spec.config_cls, TrainConfig, *extra_classes)
    method_over, explicit_train, extra_over = routed[0], routed[1], routed[2:]
    train_over = {**KIND_TRAIN_DEFAULTS[kind], **spec.train_defaults(kind), **explicit_train}
    defaults = dict(spec.defaults(kind))
    for key, dropped in spec.dropped_by.items():
        if key in explicit_train:
            for name in dropped:
                defaults.pop(name, None)
    extras = tuple(c(**over) for c, over in zip(extra_classes, extra_over, strict=True))
    method_cfg, train_cfg = spec.config_cls(**{**defaults, **method_over}), TrainConfig(**train_over)
    method_cfg = spec.plan(method_cfg, train_cfg, None)  # e.g. LT-SFT: can max_steps be split into its phases?
    return (method_cfg, train_cfg, *extras)


def resolve_epochs(method: str, method_cfg: Any, train_cfg: TrainConfig, num_examples: int) -> Any:
    """The method config planned for the data once it is known (e.g. epoch-based phases -> steps), before a run."""
    return get_method(method).plan(method_cfg, train_cfg, num_examples)


def base_ref(base) -> dict[str, str]:
    """The base as a module manifest records it (name, fingerprint, model type)."""
    return {"name": base.name, "fingerprint": base.fingerprint, "model_type": base.model.config.model_type}


def run_tags(kind: str, lang: str, lang_name: str, task: str | None, method: str, base) -> dict[str, str]:
    """The identity tags of a training run (what ``--resume`` and the registry search by), and the language's name."""
    return {
        "xlpeft.kind": kind, "xlpeft.lang": lang, "xlpeft.task": task or "none", "xlpeft.method": method,
        "xlpeft.base": base.name, "xlpeft.base_fingerprint": base.fingerprint, "xlpeft.lang_name": lang_name,
    }


def start_training(base_name: str, cfg: TrainConfig) -> tuple[Base, torch.device]:
    """Load the frozen base on this rank's device.

    The tracking store is probed first: a dead server is reported before a large base is loaded.
    The caller joins the process group (``init_from_env``) only once its own input checks pass,
    so a bad command under torchrun fails with one error line, not with gloo's threads alive.
    """
    tracking.check_reachable()
    device = local_device(cfg.device)
    return load_base(base_name, device=device), device


def count_parameters(tensors: dict[str, dict], extra: dict[str, Any], skip: tuple[str, ...] = ()) -> int:
    """Trainable parameters of a module: the method's own count if it gives one, else every saved element."""
    if "trainable_parameters" in extra:
        return int(extra.pop("trainable_parameters"))
    return sum(t.numel() for stem, s in tensors.items() if stem not in skip for t in s.values())


def cached_before(key: dict[str, Any], compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The held-out loss before training, computed once per ``key`` and kept in ``$XLPEFT_CACHE/eval-before/``.

    ``key`` must name everything the figure depends on (base and corpus fingerprints, the blocks, the
    masking seed, the method and its config, the device and the xlpeft version): re-running a
    configuration, or changing only what comes after step 0 (steps, learning rate), then costs no
    evaluation. The evaluation draws no random numbers training uses, so skipping it changes nothing else.
    """
    from xlpeft import __version__
    from xlpeft.models import cache_dir

    digest = hashlib.sha256(json.dumps({**key, "xlpeft": __version__}, sort_keys=True, default=str).encode())
    path = cache_dir() / "eval-before" / f"{digest.hexdigest()[:32]}.json"
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(found, dict) and all(isinstance(v, float) for v in found.values()) and found:
            print("held-out loss before training: from the cache (this configuration was evaluated before)",
                  file=sys.stderr, flush=True)
            return found
    except (OSError, ValueError):
        pass
    result = compute()
    try:  # a read-only cache only costs the evaluation next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(result)}")
        tmp.write_text(json.dumps(result), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass
    return result
