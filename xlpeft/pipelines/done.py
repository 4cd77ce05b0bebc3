"""Whether a pipeline step is already done, so re-running a half-finished pipeline continues it.

"Done" means the same configuration already produced its registered output: a FINISHED MLflow run
with the identity tags this step's run would carry (kind, lang, task, method, base and its
fingerprint), whose logged params equal what this step would log (compared by
:func:`xlpeft.tracking.lifecycle.param_differences`, the comparison ``--resume`` uses), and a
registry version made by that run. What the step would log comes from the recipe itself
(``plan_language`` / ``plan_task``: every check and resolution a training command makes before its
run opens), so nothing of a recipe is written twice. Commands whose configuration cannot be known
without running them (``prepare-base``, ``compose``, ``evaluate``) always run.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlpeft.errors import XlpeftError
from xlpeft.io import MANIFEST

CANNOT_TELL = "runs (cannot tell whether done)"


@dataclass(frozen=True)
class Planner:
    """How ``xlpeft run`` tells whether a step of one command is done.

    Attributes:
        request: the command's parsed options (click's ``ctx.params``) -> its recipe request, which
            has ``base`` and ``registered_name``.
        plan: request -> the recipe's plan, with ``tags``, ``params``, ``registered_name`` and ``out_dir``.
    """

    request: Callable[..., Any]
    plan: Callable[[Any], Any]


@dataclass(frozen=True)
class Decision:
    """What a step will do: run it, or skip it (restoring ``restore`` from the registered version first)."""

    run: bool
    text: str
    version: Any = None  # the RegisteredModule a skipped step is done in
    restore: Path | None = None  # the output directory does not hold that module: copy it there


def _registered_manifest(run_id: str) -> bytes | None:
    """The manifest a run logged with its module (None if its artifacts cannot be read)."""
    from xlpeft import tracking

    with tempfile.TemporaryDirectory(prefix="xlpeft-done-") as tmp:
        try:
            local = tracking.client().download_artifacts(run_id, f"module/{MANIFEST}", tmp)
            return Path(local).read_bytes()
        except Exception:  # gone, moved, or the store stopped answering: the step cannot count as done
            return None


def _done(plan: Any) -> Decision:
    """The decision for a resolved plan: skip if a finished run logged the same params and registered its module."""
    from xlpeft.tracking.lifecycle import find_finished

    found = find_finished(plan.tags, plan.params, plan.registered_name, plan.param_defaults)
    if found is None:
        return Decision(True, "would run (no finished run logged this configuration)")
    run_id, version = found
    logged = _registered_manifest(run_id)
    if logged is None:
        return Decision(True, f"would run (run {run_id} is done, but the artifacts of {version.name} "
                              f"v{version.version} cannot be read)")
    text = f"skip: done in run {run_id} (registered {version.name} v{version.version})"
    local = Path(plan.out_dir) / MANIFEST
    if local.is_file() and local.read_bytes() == logged:
        return Decision(False, text, version)
    return Decision(False, f"{text}; restores {plan.out_dir} from it", version, Path(plan.out_dir))


def decide(planner: Planner | None, params: dict[str, Any] | None, force: bool = False) -> Decision:
    """Whether a step runs: ``params`` are its parsed options (None when an input it names does not exist yet)."""
    from xlpeft import tracking

    if force:
        return Decision(True, "would run (--force)")
    if planner is None:
        return Decision(True, CANNOT_TELL)
    if params is None:
        return Decision(True, f"{CANNOT_TELL[:-1]}: a file it reads does not exist yet)")
    try:
        req = planner.request(**params)
        # cheap first: without a version of this name on this base there is nothing to compare, so no base is loaded
        if not any(v.tags.get("xlpeft.base") == req.base for v in tracking.list_versions(req.registered_name)):
            return Decision(True, "would run")
        plan = planner.plan(req)
    except XlpeftError as exc:
        return Decision(True, f"{CANNOT_TELL[:-1]}: {exc})")
    try:
        return _done(plan)
    finally:
        del plan
        gc.collect()  # the plan holds a loaded base; the step itself loads its own


def restore(decision: Decision) -> Path:
    """Copy a skipped step's registered module into its output directory, so later steps read what it names."""
    from xlpeft import tracking
    from xlpeft.io import install_dir

    source, _ = tracking.download(decision.version)
    return install_dir(source, decision.restore, MANIFEST, "an xlpeft module")
