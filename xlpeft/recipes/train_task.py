"""``xlpeft train-task``: train a task module (adapter or delta, plus a head) over a language module.

MAD-X / LT-SFT recipe: the *source* language's module is active and frozen while the task
module learns, so the task module learns behaviour that transfers when the language module
is later swapped for a target language's.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from xlpeft import tracking
from xlpeft.compose import activate
from xlpeft.config import DEFAULT_BASE, DEFAULT_METHOD, check_fields
from xlpeft.data.batches import ExampleBatches
from xlpeft.data.encoded_cache import cached_encoding, encoding_key
from xlpeft.data.tasks import data_fingerprint, load_examples
from xlpeft.distributed import init_from_env
from xlpeft.evaluation import default_label, encode, evaluate_task, warn_truncated
from xlpeft.io import Manifest, check_module_output
from xlpeft.lineage import language_module_for_task
from xlpeft.methods.heads import build_head
from xlpeft.packs import language_name, load_task_pack
from xlpeft.recipes.common import base_ref, count_parameters, resolve_configs, resolve_epochs, run_tags, start_training
from xlpeft.registry import get_method
from xlpeft.tracking.lifecycle import publish, training_run
from xlpeft.tracking.registration import task_datasets
from xlpeft.training import PhaseRun, fit_train_config, labelled_count, run_phases, task_loss


@dataclass(frozen=True)
class TaskConfig:
    """Task-module settings that are neither the method's nor the optimiser's."""

    lang_module: str = field(default="auto", metadata={"help": "auto (newest registered for --lang on this base, of the task's method if any), none, a module directory, a registered NAME[@VERSION|@ALIAS], or a hub id hf:ORG/REPO[@REV]"})
    head_dropout: float = field(default=0.1, metadata={"help": "dropout before the task head", "min": 0.0, "max": 1.0})

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TaskRequest:
    task: str
    lang: str = "en"
    method: str = DEFAULT_METHOD
    base: str = DEFAULT_BASE
    train_data: str | None = None
    eval_data: str | None = None
    sets: dict[str, str] = field(default_factory=dict)  # --set key=value (the CLI's --max-steps etc. included)
    output: str | None = None
    resume: bool = False
    overwrite: bool = False  # replace an xlpeft module of another kind at --output

    @property
    def registered_name(self) -> str:
        """The registry name the module will get (``xlpeft run`` looks it up before planning a step)."""
        return tracking.registered_name("task", self.task, self.method)


@dataclass
class TaskResult:
    path: Path
    run_id: str
    registered_name: str
    version: str
    metrics: dict[str, float]
    lang_module: str | None


def parent_tags(lineage: dict) -> dict[str, str]:
    """Run tags naming the language module a task module trains over (none without one)."""
    if not lineage:
        return {}
    tags = {"xlpeft.parent.lang_run": lineage["run_id"]} if lineage.get("run_id") else {}
    tags["xlpeft.parent.lang_module"] = (f"{lineage['registered_name']} v{lineage['version']}"
                                         if lineage.get("registered_name") else lineage["path"])
    tags["xlpeft.parent.lang_method"] = lineage["method"]
    return tags


@dataclass
class TaskPlan:
    """Everything ``train-task`` resolves before a run opens: the tags and params the run will log, and their inputs."""

    pack: Any
    spec: Any
    method_cfg: Any
    cfg: Any
    task_cfg: TaskConfig
    train_ex: list
    eval_ex: list
    train_desc: list
    out_dir: Path
    base: Any
    device: torch.device
    dist: Any
    lang_module: Any
    lineage: dict
    train_enc: Any
    registered_name: str
    tags: dict[str, str]
    params: dict[str, Any]
    sources: list = field(default_factory=list)  # the TaskSources read: training data first, then eval data


def plan_task(req: TaskRequest) -> TaskPlan:
    """Check everything and resolve the run's tags and params, before an MLflow run exists.

    ``xlpeft run`` calls it too, to tell whether a finished run already logged this configuration.
    """
    pack = load_task_pack(req.task)
    lang_name = language_name(req.lang)  # any ISO 639 code; an invalid one fails here, before any data is read
    spec = get_method(req.method)
    method_cfg, cfg, task_cfg = resolve_configs(req.method, "task", req.sets, TaskConfig)
    train_ex, eval_ex, sources = load_examples(pack, req.lang, req.train_data, req.eval_data, cfg.eval_fraction,
                                               cfg.seed)
    limit = cfg.eval_batches * cfg.batch_size  # as for MLM blocks: a 6,689-sentence dev set costs minutes per eval
    if len(eval_ex) > limit:
        print(f"evaluating on the first {limit} of {len(eval_ex)} evaluation examples (eval_batches={cfg.eval_batches} "
              f"x batch_size={cfg.batch_size}; raise --set eval_batches to use more)", file=sys.stderr, flush=True)
        eval_ex = eval_ex[:limit]
    train_desc = [sources[0].describe()]
    method_cfg = resolve_epochs(req.method, method_cfg, cfg, len(train_ex))  # LT-SFT's epoch-based phases -> steps
    out_dir = check_module_output(req.output or f"modules/task-{req.task}-{req.method}", "task", req.overwrite)
    base, device = start_training(req.base, cfg)
    cfg = fit_train_config(cfg, base, req.sets)  # max_seq_len within the base's position table
    spec.check(base, method_cfg, cfg)  # what the method checks against this base, before any run opens
    lang_module, lineage = language_module_for_task(task_cfg.lang_module, req.lang, base, req.method)
    if lang_module is not None:
        lang_module.check_base(base.fingerprint)
    key = encoding_key(train_ex, base.tokenizer, list(pack.labels), pack.head, cfg.max_seq_len)
    train_enc, hit = cached_encoding(key, lambda: encode(pack, base.tokenizer, train_ex, cfg.max_seq_len,
                                                         purpose="training data"))  # tokenised once per data + base
    if hit and train_enc.truncated:  # the warning encode() gives, from the cached counts
        warn_truncated(train_enc, len(train_ex), cfg.max_seq_len, "training data", default_label(pack))
    name = req.registered_name
    tags = {**run_tags("task", req.lang, lang_name, req.task, req.method, base), **parent_tags(lineage)}
    params = {"method": asdict(method_cfg), "train": asdict(cfg), "task_config": asdict(task_cfg), "task": req.task,
              "lang": req.lang, "base": base.name, "train_data": ", ".join(train_desc),
              "train_data_fingerprint": data_fingerprint(*sources),
              "train_examples": len(train_ex), "eval_examples": len(eval_ex), "lang_module": str(lineage or "none")}

    dist = init_from_env(device)
    return TaskPlan(pack, spec, method_cfg, cfg, task_cfg, train_ex, eval_ex, train_desc, out_dir, base, device, dist,
                    lang_module, lineage, train_enc, name, tags, params, sources)


def train_task(req: TaskRequest) -> TaskResult:
    """Train, evaluate, save, log and register a task module."""
    p = plan_task(req)  # ---- setup: everything checkable is checked before an MLflow run exists
    pack, spec, method_cfg, cfg, task_cfg, base, device, dist = (p.pack, p.spec, p.method_cfg, p.cfg, p.task_cfg,
                                                                 p.base, p.device, p.dist)
    train_ex, eval_ex, train_desc, out_dir, lang_module, lineage, train_enc = (
        p.train_ex, p.eval_ex, p.train_desc, p.out_dir, p.lang_module, p.lineage, p.train_enc)
    name, tags, params = p.registered_name, p.tags, p.params

    # ---- train
    with training_run(f"task-{req.task}-{req.method}", tags, params, dist, req.resume, out_dir) as (
        tracker, ckpt_dir, checkpoint,
    ):
        tracker.log_inputs(task_datasets(p.sources, len(train_ex), len(eval_ex)))  # the UI's Dataset column
        active = activate(base, [lang_module]) if lang_module is not None else None
        torch.manual_seed(cfg.seed)
        head = build_head(pack.head, base.hidden_size, len(pack.labels), task_cfg.head_dropout).to(device)
        trainable = spec.prepare(base, method_cfg, cfg)
        data = ExampleBatches(train_enc, len(train_ex), cfg.batch_size, base.tokenizer.pad_token_id,
                              torch.Generator().manual_seed(cfg.seed))

        dist.seed_dropout(cfg.seed)  # after the head and module are initialised identically on every rank

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            n_global = labelled_count(batch["labels"])  # the whole global batch's count, identical on every rank
            return task_loss(base, head, {k: dist.shard(v).to(device) for k, v in batch.items()}, n_global)

        def evaluate() -> dict[str, float]:
            return {f"eval_{k}": v for k, v in evaluate_task(base, head, pack, base.tokenizer, eval_ex, cfg.max_seq_len).items()}

        base.model.train()
        head.train()
        run = PhaseRun(trainable, {"head": head}, data, {}, loss_fn, evaluate, cfg, tracker,
                       f"{req.task}/{req.lang}", ckpt_dir if dist.main else None, dist)
        try:
            done, summary = run_phases(run, checkpoint)
            metrics = evaluate()
            tracker.log_metrics(metrics, done)
            tensors, extra = trainable.export()
        finally:  # the in-memory base is restored exactly whatever happened
            trainable.close()
            if active is not None:
                active.remove()
        head_params = sum(p.numel() for p in head.parameters())
        tensors["head"] = head.state_dict()
        manifest = Manifest(
            kind="task", method=req.method, lang=req.lang, task=req.task, base=base_ref(base),
            config=asdict(method_cfg),
            trainable_parameters=count_parameters(tensors, extra, skip=("head",)) + head_params,
            training={"steps": done, "phases": summary, "seed": cfg.seed, "train": asdict(cfg),
                      "world_size": dist.world, "train_data": train_desc, "metric": pack.metric, "eval": metrics},
            extra={**extra, "labels": list(pack.labels), "head": pack.head, "head_dropout": task_cfg.head_dropout,
                   "lang_module": lineage or None},
        )
        version = publish(tracker, dist, out_dir, manifest, tensors, name, tags, done, ckpt_dir)
    dist.close()
    return TaskResult(out_dir, tracker.run_id, name, version, {k.removeprefix("eval_"): v for k, v in metrics.items()},
                      lineage.get("registered_name") or lineage.get("path"))
