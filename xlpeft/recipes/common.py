"""Pieces every training recipe shares: config resolution, tags, and publishing a module."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xlpeft import tracking
from xlpeft.checkpoint import optimizer_state, restore_rng, rng_state, save_checkpoint
from xlpeft.config import TrainConfig, split_overrides
from xlpeft.distributed import Dist, local_device
from xlpeft.io import Manifest, load_module, save_module
from xlpeft.models import Base, load_base
from xlpeft.registry import get_method
from xlpeft.training import Resume, train_loop


def resolve_configs(method: str, kind: str, sets: dict[str, Any], *extra_classes: type,
                    train_defaults: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """(method config, TrainConfig, *extra configs) from ``--set`` overrides (the CLI's flags arrive as keys too).

    Precedence, lowest first: TrainConfig's own defaults, the recipe's ``train_defaults``, the
    method's per-kind ``spec.train_defaults(kind)`` (e.g. LT-SFT's lr 5e-5), ``--set``. Method
    fields: the dataclass defaults, ``spec.defaults(kind)``, ``--set``; ``spec.dropped_by`` names
    per-kind defaults that an explicit training key replaces (LT-SFT's task epochs give way to an
    explicit ``max_steps``). Unknown keys are reported against the union of all the classes' fields.
    """
    spec = get_method(method)
    routed = split_overrides(sets, spec.config_cls, TrainConfig, *extra_classes)
    method_over, explicit_train, extra_over = routed[0], routed[1], routed[2:]
    train_over = {**(train_defaults or {}), **spec.train_defaults(kind), **explicit_train}
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
    return {"name": base.name, "fingerprint": base.fingerprint, "model_type": base.model.config.model_type}


def run_tags(kind: str, lang: str | None, task: str | None, method: str, base) -> dict[str, str]:
    return {
        "xlpeft.kind": kind, "xlpeft.lang": lang or "none", "xlpeft.task": task or "none", "xlpeft.method": method,
        "xlpeft.base": base.name, "xlpeft.base_fingerprint": base.fingerprint,
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


def publish(tracker, dist: Dist, out_dir: Path, manifest: Manifest, tensors: dict, registered_name: str,
            tags: dict[str, str], step: int, ckpt_dir: Path) -> str:
    """On rank 0: save the module atomically, verify it reads back, log it, register it, drop checkpoints.

    Registration comes last so the registry never points at a half-written module; the other
    ranks wait at the barrier and get an empty version.
    """
    version = ""
    if dist.main:
        save_module(out_dir, manifest, tensors)
        load_module(out_dir)
        tracker.log_artifacts(out_dir, "module")
        tracker.log_metrics({"trainable_parameters": manifest.trainable_parameters}, step)
        version = tracker.register(registered_name, "module", tags)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    dist.barrier()
    return version


def count_parameters(tensors: dict[str, dict], extra: dict[str, Any], skip: tuple[str, ...] = ()) -> int:
    """Trainable parameters of a module: the method's own count if it gives one, else every saved element."""
    if "trainable_parameters" in extra:
        return int(extra.pop("trainable_parameters"))
    return sum(t.numel() for stem, s in tensors.items() if stem not in skip for t in s.values())


def config_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)


# ---- running a method's phases, with checkpoints, resume and data parallelism

class NullTracker:
    """Stands in for the MLflow run on data-parallel ranks other than 0."""

    run_id = ""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


@dataclass
class PhaseRun:
    """Everything the phase loop needs; one object so both recipes drive it the same way."""

    trainable: Any  # registry.Trainable
    extras: dict[str, nn.Module]  # dense modules trained alongside (a task head)
    data: Any  # resumable batch iterator with state_dict/load_state_dict
    generators: dict[str, torch.Generator]  # other RNGs to checkpoint (masking)
    loss_fn: Any
    evaluate: Any
    cfg: TrainConfig
    tracker: Any
    desc: str
    checkpoint_dir: Path | None
    dist: Dist


def run_phases(run: PhaseRun, resume: tuple[dict[str, torch.Tensor], dict] | None = None,
               state: dict[str, Any] | None = None) -> tuple[int, dict]:
    """Train every phase of the method; return (total steps, per-phase summary).

    With ``resume`` (a loaded checkpoint), phases already finished are skipped, the current one
    restarts at its checkpointed step with the exact optimizer, scheduler, RNG and data state.
    ``state`` is recipe data carried in every checkpoint (e.g. the loss before training).
    """
    phases = run.trainable.phases
    start_phase, resume_state = 0, None
    summary: dict[str, Any] = {}
    # the extras' initial values, for a phase that resets them (checkpointed: a resumed run restores them too)
    initial = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in run.extras.items()}
    if resume is not None:
        tensors, meta = resume
        start_phase = meta["phase"]
        summary = {k: v for k, v in meta["summary"].items() if k not in (state or {})}
        run.data.load_state_dict(tensors)
        restore_rng(tensors, run.generators)
        run.dist.seed_dropout(run.cfg.seed, meta["done"])  # the checkpoint holds rank 0's stream; others re-seed
        for name, module in run.extras.items():
            module.load_state_dict(_unprefix(tensors, f"extra.{name}."))
            initial[name] = _unprefix(tensors, f"extra0.{name}.") or initial[name]
        resume_state = Resume(meta["step"], (tensors, meta["optimizer"]), meta["scheduler"], meta["window"])
    done = sum(p.steps for p in phases[:start_phase])
    for index in range(start_phase, len(phases)):
        phase = phases[index]
        if resume_state is not None and index == start_phase:
            params = run.trainable.resume_phase(phase, _unprefix(resume[0], "trainable."))
        else:
            if phase.reset_extras:
                for name, module in run.extras.items():
                    module.load_state_dict(initial[name])
            params = run.trainable.begin_phase(phase)
        params = params + [p for m in run.extras.values() for p in m.parameters()]

        def checkpoint(step: int, optimizer, scheduler, window, index=index, done=done) -> None:
            if run.checkpoint_dir is None or not run.dist.main:
                return
            tensors = {f"trainable.{k}": v for k, v in run.trainable.state_dict().items()}
            for name, module in run.extras.items():
                tensors.update({f"extra.{name}.{k}": v for k, v in module.state_dict().items()})
                tensors.update({f"extra0.{name}.{k}": v for k, v in initial[name].items()})
            opt_tensors, opt_meta = optimizer_state(optimizer)
            tensors.update(opt_tensors)
            tensors.update(rng_state(run.generators))
            tensors.update(run.data.state_dict())
            meta = {"phase": index, "step": step, "done": done + step, "optimizer": opt_meta,
                    "scheduler": scheduler.state_dict(), "window": list(window), "summary": {**summary, **(state or {})}}
            save_checkpoint(run.checkpoint_dir, tensors, meta)
            run.tracker.log_metrics({"checkpoint_step": done + step}, done + step)

        result = train_loop(
            params, run.data, run.loss_fn, run.cfg, phase.steps, run.tracker.log_metrics, run.evaluate,
            after_step=lambda step, p=phase: run.trainable.after_step(p, step), desc=f"{run.desc} {phase.name}",
            step_offset=done, resume=resume_state if index == start_phase else None, checkpoint=checkpoint,
            sync_grads=run.dist.sync_grads if run.dist.active else None, progress=run.dist.main,
        )
        done += phase.steps
        metrics = {f"{phase.name}_steps_per_second": result.steps_per_second, **run.trainable.end_phase(phase)}
        run.tracker.log_metrics(metrics, done)
        shared = run.trainable.replicated()
        if shared is not None:  # e.g. LT-SFT's mask: every rank must have chosen the same entries
            run.dist.same_everywhere(shared, f"the {phase.name} phase's selected state")
        summary[phase.name] = {"steps": phase.steps, "last_loss": result.last_loss, "seconds": result.seconds}
    return done, summary


def _unprefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def checkpoint_dir_for(out_dir: Path, run_id: str) -> Path:
    return out_dir.parent / ".checkpoints" / run_id


def find_resumable(tags: dict[str, str], params: dict[str, Any]) -> tuple[str, Path] | None:
    """The newest unfinished run with these identity tags and a checkpoint; refuse it if its config differs.

    Returns:
        (run id, checkpoint directory), or None if there is no unfinished run to continue.

    Raises:
        XlpeftError: the newest unfinished run was started with another configuration (keys named).
    """
    from xlpeft import tracking
    from xlpeft.errors import XlpeftError

    c = tracking.client()
    exp = c.get_experiment_by_name(tracking.EXPERIMENT)
    if exp is None:
        return None
    query = " and ".join(f"tags.`{k}` = {tracking.filter_value(v)}" for k, v in tags.items() if k in tracking.TAG_KEYS)
    runs = c.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])
    unfinished = [r for r in runs if r.info.status != "FINISHED" and "xlpeft.checkpoint_dir" in r.data.tags]
    if not unfinished:
        return None
    run = unfinished[0]
    mine = tracking._flat(params)
    differing = sorted(k for k in set(mine) | set(run.data.params) if mine.get(k) != run.data.params.get(k))
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
    from contextlib import nullcontext

    from xlpeft import tracking

    if not dist.main:
        return nullcontext(NullTracker())
    return tracking.tracked_run(run_name, tags, params, run_id=resume_id)


def resume_or_start(resume: bool, tags: dict[str, str], params: dict[str, Any], dist: Dist) -> str | None:
    """Decide (on rank 0, shared with every rank) which unfinished run to continue, if asked to."""
    import click

    found = None
    if resume and dist.main:
        found = find_resumable(tags, params)
        if found is None:
            click.echo("no unfinished run with a checkpoint matches this command; starting a new run", err=True)
    if dist.active:
        box = [found]
        torch.distributed.broadcast_object_list(box, src=0)
        found = box[0]
    return found


@contextmanager
def training_run(run_name: str, tags: dict[str, str], params: dict[str, Any], dist: Dist, resume: bool,
                 out_dir: Path):
    """Open (or, with ``resume``, reopen) the run; yields (tracker, checkpoint directory, loaded checkpoint or None)."""
    import click

    from xlpeft.checkpoint import clean_checkpoints, load_checkpoint

    resumed = resume_or_start(resume, tags, params, dist)
    with open_run(run_name, tags, params, dist, resumed and resumed[0]) as tracker:
        ckpt_dir = resumed[1] if resumed else checkpoint_dir_for(out_dir, tracker.run_id or "rank")
        clean_checkpoints(ckpt_dir.parent)  # what killed runs left: .checkpoint.safetensors.tmp-PID, empty folders
        if dist.main and not resumed:
            tracker.set_tags({"xlpeft.checkpoint_dir": str(ckpt_dir.resolve())})
        checkpoint = load_checkpoint(ckpt_dir) if resumed else None
        if checkpoint is not None and dist.main:
            click.echo(f"resuming MLflow run {tracker.run_id} at step {checkpoint[1]['done']} from {ckpt_dir}", err=True)
        yield tracker, ckpt_dir, checkpoint
