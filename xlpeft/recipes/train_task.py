"""``xlpeft train-task``: train a task module (adapter or delta, plus a head) over a language module.

MAD-X / LT-SFT recipe: the *source* language's module is active and frozen while the task
module learns, so the task module learns behaviour that transfers when the language module
is later swapped for a target language's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
import torch.nn.functional as F

from xlpeft import tracking
from xlpeft.compose import activate
from xlpeft.config import DEFAULT_BASE, DEFAULT_METHOD, check_fields
from xlpeft.data.tasks import TaskSource, collate, data_fingerprint, parse_task_data, read_source
from xlpeft.distributed import init_from_env
from xlpeft.errors import XlpeftError
from xlpeft.evaluation import encode, predict, score
from xlpeft.io import LoadedModule, Manifest, check_module_output, load_module
from xlpeft.methods.heads import build_head
from xlpeft.packs import TaskPack, load_task_pack
from xlpeft.recipes.common import (
    PhaseRun,
    base_ref,
    count_parameters,
    publish,
    resolve_configs,
    resolve_epochs,
    run_phases,
    run_tags,
    start_training,
    training_run,
)
from xlpeft.registry import get_method
from xlpeft.training import fit_train_config

TASK_TRAIN_DEFAULTS = {"max_seq_len": 128, "eval_fraction": 0.1}


@dataclass(frozen=True)
class TaskConfig:
    """Task-module settings that are neither the method's nor the optimiser's."""

    lang_module: str = field(default="auto", metadata={"help": "auto (newest registered for --lang on this base, of the task's method if any), none, or a module directory"})
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


@dataclass
class TaskResult:
    path: Path
    run_id: str
    registered_name: str
    version: str
    metrics: dict[str, float]
    lang_module: str | None


def find_language_module(lang: str, fingerprint: str,
                         method: str) -> tuple[Path, tracking.RegisteredModule, bool] | None:
    """The language module ``lang_module=auto`` trains over: ``(path, version, same method?)``.

    The newest one of the task module's own method first, as the recipes pair them (MAD-X: a
    task adapter over a language adapter, Pfeiffer et al., 2020; LT-SFT: a task delta over a
    language delta, Ansell et al., 2022); only if there is none, the newest of another method.
    """
    for wanted in (method, None):  # None: the newest of any method, so of another one (none of ``method``)
        try:
            path, reg = tracking.find_module("language", lang, wanted, fingerprint=fingerprint)
        except tracking.NotRegistered:  # not "its artifacts are gone": that one is reported
            continue
        return path, reg, wanted is not None
    return None


def resolve_lang_module(setting: str, lang: str, base, method: str) -> tuple[LoadedModule | None, dict[str, Any]]:
    """The language module to activate under a ``method`` task module, and its lineage for the manifest.

    With ``auto``, says on stderr which registered module it picked and why.
    """
    if setting == "none":
        return None, {}
    if setting != "auto":
        module = load_module(setting).expect_kind("language", "--set lang_module")
        return module, {"path": str(Path(setting).resolve()), "lang": module.manifest.lang,
                        "method": module.manifest.method}
    hit = find_language_module(lang, base.fingerprint, method)
    if hit is None:
        raise XlpeftError(
            f"no registered language module for {lang!r} on base {base.name!r} ({base.fingerprint}) in "
            f"{tracking.tracking_uri()}; train one with `xlpeft train-lang --lang {lang} --base {base.name}`, "
            "or pass --set lang_module=PATH or --set lang_module=none"
        )
    path, reg, same = hit
    why = (f"the {method} language module, as the recipe pairs them" if same else
           f"no {method} language module for {lang!r} on this base, so the newest of another method "
           f"({reg.tags.get('xlpeft.method', '?')}); train one with `xlpeft train-lang --lang {lang} "
           f"--method {method}` or pass --set lang_module=PATH to choose")
    click.echo(f"lang_module=auto: {reg.name} version {reg.version} ({why})", err=True)
    module = load_module(path).expect_kind("language", "the registered language module")
    return module, {"registered_name": reg.name, "version": reg.version, "run_id": reg.run_id,
                    "lang": module.manifest.lang, "method": module.manifest.method,
                    "picked": "same method" if same else "other method (none of the same method)"}


def load_examples(pack: TaskPack, lang: str, train_spec: str | None, eval_spec: str | None,
                  eval_fraction: float, seed: int) -> tuple[list, list, list[str]]:
    """Train and eval examples: explicit files win, else the pack's data, else a held-out slice of train."""
    labels = list(pack.labels)
    train_src: TaskSource = parse_task_data(train_spec) if train_spec else pack.source(lang, "train")
    train = read_source(train_src, pack.head, labels)
    if eval_spec:
        eval_ = read_source(parse_task_data(eval_spec), pack.head, labels)
    elif "validation" in pack.sources.get(lang, {}) and not train_spec:
        eval_ = read_source(pack.source(lang, "validation"), pack.head, labels)
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = max(1, int(len(train) * eval_fraction))
        if len(train) < 2:
            raise XlpeftError("training data has a single example; pass --eval-data or more training data")
        eval_ = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in order[n_eval:]]
    return train, eval_, [train_src.describe()]


def task_logits(base, head, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = base.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return head(hidden)  # (B, T, L) or (B, L)


def labelled_count(labels: torch.Tensor) -> int:
    """Positions that carry a label in (B, T) token labels or (B,) sequence labels."""
    return int((labels != -100).sum())


def task_loss(base, head, batch: dict[str, torch.Tensor], num_labelled: int | None = None) -> torch.Tensor:
    """Summed cross-entropy over labelled positions divided by ``num_labelled`` (default: this batch's count).

    Data-parallel ranks pass the global micro-batch's count, so summed gradients equal one process's.
    """
    logits = task_logits(base, head, batch)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1),
                            ignore_index=-100, reduction="sum")
    return total / max(num_labelled if num_labelled is not None else labelled_count(batch["labels"]), 1)


def evaluate_task(base, head, pack: TaskPack, tokenizer, examples: list, max_len: int) -> dict[str, float]:
    """Score base + head on examples, in eval mode, restoring the previous train/eval state."""
    was = (base.model.training, head.training)
    base.model.eval()
    head.eval()
    device = next(head.parameters()).device
    preds = predict(lambda b: task_logits(base, head, b), pack, tokenizer, examples, device, max_len=max_len)
    base.model.train(was[0])
    head.train(was[1])
    return score(pack, examples, preds)


class ExampleBatches:
    """Endless shuffled, padded batches of encoded examples; resumable like :class:`~xlpeft.data.mlm.BlockBatches`."""

    def __init__(self, enc, n: int, batch_size: int, pad_id: int, generator: torch.Generator) -> None:
        from xlpeft.data.mlm import BlockBatches

        self.enc, self.pad_id = enc, pad_id
        self.indices = BlockBatches(torch.arange(n), batch_size, generator)  # shuffles example indices

    def __iter__(self) -> ExampleBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate(self.enc, next(self.indices).tolist(), self.pad_id)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.indices.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.indices.load_state_dict(state)


def train_task(req: TaskRequest) -> TaskResult:
    """Train, evaluate, save, log and register a task module."""
    # ---- setup: everything checkable is checked before an MLflow run exists
    pack = load_task_pack(req.task)
    spec = get_method(req.method)
    method_cfg, cfg, task_cfg = resolve_configs(req.method, "task", req.sets, TaskConfig,
                                                train_defaults=TASK_TRAIN_DEFAULTS)
    train_ex, eval_ex, train_desc = load_examples(pack, req.lang, req.train_data, req.eval_data,
                                                  cfg.eval_fraction, cfg.seed)
    method_cfg = resolve_epochs(req.method, method_cfg, cfg, len(train_ex))  # LT-SFT's epoch-based phases -> steps
    out_dir = check_module_output(req.output or f"modules/task-{req.task}-{req.method}", "task", req.overwrite)
    base, device = start_training(req.base, cfg)
    cfg = fit_train_config(cfg, base, req.sets)  # max_seq_len within the base's position table
    lang_module, lineage = resolve_lang_module(task_cfg.lang_module, req.lang, base, req.method)
    if lang_module is not None:
        lang_module.check_base(base.fingerprint)
    train_enc = encode(pack, base.tokenizer, train_ex, cfg.max_seq_len, purpose="training data")
    name = tracking.registered_name("task", req.task, req.method)
    tags = run_tags("task", req.lang, req.task, req.method, base)
    if lineage.get("run_id"):
        tags["xlpeft.parent.lang_run"] = lineage["run_id"]
    if lineage:  # which language module the task module trains over, and (auto) why
        tags["xlpeft.parent.lang_module"] = (f"{lineage['registered_name']} v{lineage['version']}"
                                             if lineage.get("registered_name") else lineage["path"])
        tags["xlpeft.parent.lang_method"] = lineage["method"]
    params = {"method": asdict(method_cfg), "train": asdict(cfg), "task_config": asdict(task_cfg), "task": req.task,
              "lang": req.lang, "base": base.name, "train_data": ", ".join(train_desc),
              "train_data_fingerprint": data_fingerprint(req.train_data, req.eval_data),
              "train_examples": len(train_ex), "eval_examples": len(eval_ex), "lang_module": str(lineage or "none")}

    dist = init_from_env(device)

    # ---- train
    with training_run(f"task-{req.task}-{req.method}", tags, params, dist, req.resume, out_dir) as (
        tracker, ckpt_dir, checkpoint,
    ):
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
