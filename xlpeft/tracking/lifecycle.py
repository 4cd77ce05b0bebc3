"""A training run's life in MLflow: find the run to resume, open it, and publish the module it made.

Recipes call :func:`training_run` (which run, which checkpoint) and :func:`publish` (save, verify,
log, register); data-parallel ranks other than 0 get a :class:`NullTracker` and log nothing. Notes
for the user go to stderr, as every progress line does; the CLI prints results.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from xlpeft.distributed import Dist
from xlpeft.errors import XlpeftError
from xlpeft.io import Manifest, load_module, save_module


class NullTracker:
    """Stands in for the MLflow run on data-parallel ranks other than 0."""

    run_id = ""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def checkpoint_dir_for(out_dir: Path, run_id: str) -> Path:
    """Where a run writing ``out_dir`` keeps its checkpoints: ``<parent>/.checkpoints/<run id>``."""
    return out_dir.parent / ".checkpoints" / run_id


HOW_NOT_WHAT = {"train.activation_checkpointing"}
"""Settings that change how a step is computed, not what it computes: a run resumes, or counts as done, with them
switched either way (an out-of-memory run continues with ``--resume --set activation_checkpointing=true``)."""


def param_differences(params: dict[str, Any], logged: dict[str, str],
                      defaults: dict[str, str] | None = None) -> list[str]:
    """Keys whose value ``params`` would log (flattened as MLflow stores them) differs from a run's ``logged`` ones.

    The one comparison of "the same configuration": ``--resume`` refuses a run that differs, and
    ``xlpeft run`` skips a step only for a finished run that does not. With ``defaults`` (flattened
    field defaults, :func:`config_defaults`) a setting the logged run predates counts as equal while
    it is at its default, so a newer xlpeft keeps earlier runs done. A corpus read from another
    place with the same content (equal ``corpus_fingerprint``: file name and sha256) is the same corpus;
    :data:`HOW_NOT_WHAT` settings never differ.
    """
    from xlpeft.tracking.run import _flat

    mine, defaults = _flat(params), defaults or {}
    keys = set(mine) | set(logged)
    if "corpus_fingerprint" in mine and mine["corpus_fingerprint"] == logged.get("corpus_fingerprint"):
        keys.discard("corpora")  # the same files, installed or copied elsewhere
    keys -= HOW_NOT_WHAT

    def differs(k: str) -> bool:
        if k not in logged and k in defaults:
            return mine.get(k) != defaults[k]
        return mine.get(k) != logged.get(k)

    return sorted(k for k in keys if differs(k))


def config_defaults(**configs: type) -> dict[str, str]:
    """The field defaults of config dataclasses, flattened under the keys a run logs them as (``train=TrainConfig``)."""
    from dataclasses import MISSING, fields

    from xlpeft.tracking.run import _flat

    out: dict[str, str] = {}
    for key, cls in configs.items():
        for f in fields(cls):
            if f.default is not MISSING:
                out.update(_flat({key: {f.name: f.default}}))
            elif f.default_factory is not MISSING:
                out.update(_flat({key: {f.name: f.default_factory()}}))
    return out


def _runs_with_tags(tags: dict[str, str]) -> list:
    """Runs of the xlpeft experiment carrying these identity tags (those among ``TAG_KEYS``), newest first."""
    from xlpeft import tracking

    c = tracking.client()
    exp = c.get_experiment_by_name(tracking.EXPERIMENT)
    if exp is None:
        return []
    query = " and ".join(f"tags.`{k}` = {tracking.filter_value(v)}" for k, v in tags.items() if k in tracking.TAG_KEYS)
    return c.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])


def find_finished(tags: dict[str, str], params: dict[str, Any], registered_name: str,
                  defaults: dict[str, str] | None = None):
    """The newest FINISHED run with these identity tags and equal params that registered ``registered_name``.

    ``defaults``: see :func:`param_differences` (settings added since a run, at their defaults, are equal).

    Returns:
        (run id, the :class:`~xlpeft.tracking.RegisteredModule` it registered), or None.
    """
    from xlpeft import tracking

    versions = {v.run_id: v for v in reversed(tracking.list_versions(registered_name))}  # newest wins per run
    for run in _runs_with_tags(tags):
        if (run.info.status == "FINISHED" and run.info.run_id in versions
                and not param_differences(params, run.data.params, defaults)):
            return run.info.run_id, versions[run.info.run_id]
    return None


def find_resumable(tags: dict[str, str], params: dict[str, Any]) -> tuple[str, Path] | None:
    """The newest unfinished run with these identity tags and a checkpoint; refuse it if its config differs.

    Returns:
        (run id, checkpoint directory), or None if there is no unfinished run to continue.

    Raises:
        XlpeftError: the newest unfinished run was started with another configuration (keys named).
    """
    from xlpeft.tracking.run import _flat

    runs = _runs_with_tags(tags)
    unfinished = [r for r in runs if r.info.status != "FINISHED" and "xlpeft.checkpoint_dir" in r.data.tags]
    if not unfinished:
        return None
    run = unfinished[0]
    mine = _flat(params)
    differing = param_differences(params, run.data.params)
    changed = [k for k in differing if k.endswith("fingerprint") and k in mine and k in run.data.params]
    if changed:
        raise XlpeftError(f"the unfinished run {run.info.run_id} trained on other data: the content of its "
                          f"{', '.join(k.removesuffix('_fingerprint').replace('_', ' ') for k in changed)} changed "
                          f"since (fingerprint {run.data.params[changed[0]]} then, {mine[changed[0]]} now); "
                          "restore the files to resume, or drop --resume to start a new run on the new data")
    if differing:
        shown = "; ".join(f"{k}: {run.data.params.get(k)!r} then, {mine.get(k)!r} now" for k in differing[:8])
        raise XlpeftError(f"the unfinished run {run.info.run_id} was started with another configuration ({shown}); "
                          "re-run with the same options to resume it, or drop --resume to start a new run")
    return run.info.run_id, Path(run.data.tags["xlpeft.checkpoint_dir"])


def open_run(run_name: str, tags: dict[str, str], params: dict[str, Any], dist: Dist, resume_id: str | None = None):
    """The MLflow run for this process: a new one, the resumed one (``resume_id``), or a stand-in on ranks > 0."""
    from xlpeft.tracking.run import tracked_run

    if not dist.main:
        return nullcontext(NullTracker())
    return tracked_run(run_name, tags, params, run_id=resume_id)


def resume_or_start(resume: bool, tags: dict[str, str], params: dict[str, Any], dist: Dist) -> tuple[str, Path] | None:
    """Decide (on rank 0, shared with every rank) which unfinished run to continue, if asked to."""
    found = None
    if resume and dist.main:
        found = find_resumable(tags, params)
        if found is None:
            print("no unfinished run with a checkpoint matches this command; starting a new run", file=sys.stderr,
                  flush=True)
    if dist.active:
        box = [found]
        torch.distributed.broadcast_object_list(box, src=0)
        found = box[0]
    return found


@contextmanager
def training_run(run_name: str, tags: dict[str, str], params: dict[str, Any], dist: Dist, resume: bool,
                 out_dir: Path) -> Iterator[tuple[Any, Path, tuple[dict[str, torch.Tensor], dict] | None]]:
    """Open (or, with ``resume``, reopen) the run; yields (tracker, checkpoint directory, loaded checkpoint or None)."""
    from xlpeft.checkpoint import clean_checkpoints, load_checkpoint

    resumed = resume_or_start(resume, tags, params, dist)
    with open_run(run_name, tags, params, dist, resumed and resumed[0]) as tracker:
        ckpt_dir = resumed[1] if resumed else checkpoint_dir_for(out_dir, tracker.run_id or "rank")
        clean_checkpoints(ckpt_dir.parent)  # what killed runs left: .checkpoint.safetensors.tmp-PID, empty folders
        if dist.main and not resumed:
            tracker.set_tags({"xlpeft.checkpoint_dir": str(ckpt_dir.resolve())})
        checkpoint = load_checkpoint(ckpt_dir) if resumed else None
        if checkpoint is not None and dist.main:
            print(f"resuming MLflow run {tracker.run_id} at step {checkpoint[1]['done']} from {ckpt_dir}",
                  file=sys.stderr, flush=True)
        yield tracker, ckpt_dir, checkpoint


def publish(tracker, dist: Dist, out_dir: Path, manifest: Manifest, tensors: dict, registered_name: str,
            tags: dict[str, str], step: int, ckpt_dir: Path, parents: list[str] | None = None) -> str:
    """On rank 0: save the module atomically, verify it reads back, log it, register it, drop checkpoints.

    ``parents``: the modules this one is built from and carries (``MethodSpec.parents``: a fusion's
    fused adapters), tagged ``xlpeft.parent.<i>`` on the run and the version as a merge's parents are.

    Registration comes last so the registry never points at a half-written module; the other
    ranks wait at the barrier and get an empty version. The version's description (what it was
    trained on, steps, headline metrics, parent modules) comes from the manifest.
    """
    from xlpeft.tracking.flavor import write_module_mlmodel
    from xlpeft.tracking.registration import module_description, parents_of

    version = ""
    if dist.main:
        lineage = {f"xlpeft.parent.{i}": source for i, source in enumerate(parents or [])}
        if lineage:
            tracker.set_tags(lineage)
            tags = {**tags, **lineage}
        save_module(out_dir, manifest, tensors)
        load_module(out_dir)
        write_module_mlmodel(out_dir, manifest)  # the module folder is an MLflow Model too (before the upload check)
        tracker.log_artifacts(out_dir, "module")
        tracker.log_metrics({"trainable_parameters": manifest.trainable_parameters}, step)
        version = tracker.register(registered_name, "module", tags,
                                   description=module_description(manifest, registered_name, parents_of(tags)))
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    dist.barrier()
    return version
