"""Training checkpoints for exact resume: one safetensors file, written atomically. No pickle.

A checkpoint holds the method's trainable state, AdamW and scheduler state, every RNG state
(global torch RNG for dropout, the data-order and masking generators) and the data position,
so a resumed run computes exactly what an uninterrupted one would have. Tensors go in the
safetensors body; everything else is JSON in its metadata header.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from xlpeft.errors import XlpeftError

CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``directory/checkpoint.safetensors`` atomically (temporary name, fsync, rename).

    Temporaries a killed process left behind are removed first. If the write fails (a full disk),
    the previous checkpoint stays, no temporary or empty directory is left, and the error says why.
    """
    from xlpeft.io import clean_stale, disk_error, non_finite

    bad = non_finite((k, v) for k, v in tensors.items() if k.startswith("trainable."))
    if bad:  # a NaN checkpoint would only resume into NaN: keep the last good one instead
        raise XlpeftError(f"the trained weights became non-finite (NaN or infinite) by step {meta.get('done')} "
                          f"({len(bad)} tensor(s), e.g. {bad[0][len('trainable.'):]}); stopped without writing this "
                          "checkpoint, the last good one is kept. Lower --set lr and train again")
    fresh = not directory.exists()
    target = directory / CHECKPOINT
    tmp = directory / f".{CHECKPOINT}.tmp-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        clean_stale(directory, f".{CHECKPOINT}.tmp-")
        body = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(body, str(tmp), metadata={"xlpeft": json.dumps(meta)})
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if fresh:  # leave no empty .checkpoints/<run>/ (nor an empty .checkpoints/) behind
            shutil.rmtree(directory, ignore_errors=True)
            try:
                directory.parent.rmdir()
            except OSError:
                pass
        kept = f"; the checkpoint of an earlier step is kept in {directory}" if target.is_file() else ""
        raise XlpeftError(disk_error(exc, f"could not write the training checkpoint at step {meta.get('done')}")
                          + kept + " (--set checkpoint_every=0 trains without checkpoints)") from None
    return target


def clean_checkpoints(root: Path, max_age: float = 3600.0) -> None:
    """Under ``.checkpoints/``: remove temporaries of killed processes, and run folders left empty for an hour."""
    import time

    from xlpeft.io import clean_stale

    if not root.is_dir():
        return
    for run_dir in root.iterdir():
        if not run_dir.is_dir() or run_dir.is_symlink():
            continue
        clean_stale(run_dir, f".{CHECKPOINT}.tmp-", max_age)
        try:
            if not any(run_dir.iterdir()) and time.time() - run_dir.stat().st_mtime > max_age:
                run_dir.rmdir()
        except OSError:
            continue


def check_finite_loss(loss: float, step: int, lr: float) -> None:
    """Stop at the first non-finite training loss: every later step would train on NaN and save a NaN module.

    Raises:
        XlpeftError: naming the step; the last checkpoint written before it (if any) is kept.
    """
    if not math.isfinite(loss):
        raise XlpeftError(f"the training loss became non-finite ({loss}) at step {step} (learning rate {lr:.3g}); "
                          "stopped without saving or registering a module, earlier checkpoints are kept. "
                          "Lower --set lr or --set max_grad_norm and train again")


def load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    path = directory / CHECKPOINT
    if not path.is_file():
        raise XlpeftError(f"no checkpoint at {path}; the run cannot be resumed (start it again without --resume)")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = json.loads(fh.metadata()["xlpeft"])
        return load_file(str(path)), meta
    except Exception as exc:
        raise XlpeftError(f"checkpoint {path} is unreadable ({exc}); start the run again without --resume") from None


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state dict into tensors + JSON (param indices as keys)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                      prefix: str = "optim") -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """Global torch RNG (dropout) and named generators, as byte tensors."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    out.update({f"rng.{name}": g.get_state() for name, g in generators.items()})
    return out


def restore_rng(tensors: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    for name, g in generators.items():
        g.set_state(tensors[f"rng.{name}"])
