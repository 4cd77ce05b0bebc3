"""``xlpeft train-task``: train a task module (adapter or delta, plus a head) over a language module.

MAD-X / LT-SFT recipe: the *source* language's module is active and frozen while the task
module learns, so the task module learns behaviour that transfers when the language module
is later swapped for a target language's.

Multi-source (``--lang en,tr,id``): each batch comes from one source, drawn by size with a
temperature or uniformly, with that source's language module swapped in under the task module
(:mod:`xlpeft.multisource`; composable-sft's multi-source recipe, Ansell et al. 2022).
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
from xlpeft.data.batches import ExampleBatches, SourceBatches
from xlpeft.data.encoded_cache import cached_encoding, encoding_key
from xlpeft.data.tasks import data_fingerprint, load_examples
from xlpeft.distributed import init_from_env
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.evaluation import default_label, encode, evaluate_task, warn_truncated
from xlpeft.io import Manifest, check_module_output
from xlpeft.lineage import language_module_for_task
from xlpeft.methods.heads import build_head
from xlpeft.multisource import SAMPLINGS, LanguageSwitch, sampling_probabilities
from xlpeft.packs import language_name, load_task_pack
from xlpeft.recipes.common import base_ref, count_parameters, resolve_configs, resolve_epochs, run_tags, start_training
from xlpeft.registry import get_method
from xlpeft.tracking.lifecycle import config_defaults, publish, training_run
from xlpeft.tracking.registration import task_datasets
from xlpeft.training import PhaseRun, fit_train_config, labelled_count, run_phases, task_loss
from xlpeft.vocab import tokenizer_for


@dataclass(frozen=True)
class TaskConfig:
    """Task-module settings that are neither the method's nor the optimiser's."""

    lang_module: str = field(default="auto", metadata={"help": "auto (newest registered for --lang on this base, of the task's method if any), none, a module directory, a registered NAME[@VERSION|@ALIAS], or a hub id hf:ORG/REPO[@REV]; with several --lang sources, one per source, comma-separated in the same order (or auto)"})
    head_dropout: float = field(default=0.1, metadata={"help": "dropout before the task head", "min": 0.0, "max": 1.0})
    sampling: str = field(default="proportional", metadata={"help": "multi-source: which source each batch comes from: proportional (to size^(1/temperature)) or uniform", "choices": SAMPLINGS})
    temperature: float = field(default=1.0, metadata={"help": "multi-source proportional sampling: p_i ~ n_i^(1/T); 1 = by size, larger flattens towards uniform (XLM-R's alpha=0.3 is T=3.3)", "gt": 0.0})

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
class SourcePlan:
    """One source language of a task module: its examples, their encoding and the language module under it."""

    lang: str
    train_ex: list
    eval_ex: list
    data: list  # the TaskSources read: training data first, then eval data
    train_enc: Any
    lang_module: Any
    lineage: dict
    tokenizer: Any  # the base's, or with the language module's new words (train-lang --set new_tokens)


@dataclass
class TaskPlan:
    """Everything ``train-task`` resolves before a run opens: the tags and params the run will log, and their inputs."""

    pack: Any
    spec: Any
    method_cfg: Any
    cfg: Any
    task_cfg: TaskConfig
    sources: list[SourcePlan]  # one per --lang source, in order; the first one's module is the baseline's
    train_desc: list
    out_dir: Path
    base: Any
    device: torch.device
    dist: Any
    registered_name: str
    tags: dict[str, str]
    params: dict[str, Any]
    probs: list[float] = field(default_factory=lambda: [1.0])  # each source's chance per batch

    @property
    def data_sources(self) -> list:
        return [d for s in self.sources for d in s.data]

    @property
    def param_defaults(self) -> dict[str, str]:
        """The logged settings' defaults: a run from before a setting existed is done while it is at its default."""
        return config_defaults(train=type(self.cfg), method=type(self.method_cfg), task_config=type(self.task_cfg))


MULTI_SOURCE_FIELDS = ("sampling", "temperature")  # TaskConfig fields only a multi-source run uses and logs


def per_source(value: str | None, langs: list[str], option: str) -> list[str | None]:
    """``--train-data a,b`` / ``--set lang_module=a,b``: one entry per source, in --lang order (None: the default)."""
    if value is None or len(langs) == 1:
        return [value] * len(langs)
    parts = [v.strip() for v in value.split(",")]
    if len(parts) == 1 and option == "lang_module" and value in ("auto", "none"):
        return parts * len(langs)
    if len(parts) != len(langs) or not all(parts):
        raise XlpeftError(f"{option}: expected one value per source language ({len(langs)}: {', '.join(langs)}), "
                          f"comma-separated in the same order; got {len(parts)} ({value!r})")
    return parts


def source_languages(lang: str) -> list[str]:
    """``--lang en`` or ``--lang en,tr,id``: the source languages, each a valid code, none twice."""
    langs = [code.strip() for code in lang.split(",")]
    repeated = sorted({code for code in langs if langs.count(code) > 1})
    if not all(langs) or repeated:
        raise XlpeftError(f"--lang: expected source language codes, comma-separated, each once; got {lang!r}"
                          + (f" ({', '.join(repeated)} twice)" if repeated else ""))
    return langs


def _read_source(pack, lang: str, train_spec, eval_spec, cfg, multi: bool) -> tuple[list, list, list]:
    """One source's (train examples, eval examples, TaskSources read); errors name the source."""
    where = f"source {lang}: " if multi else ""
    try:
        train_ex, eval_ex, data = load_examples(pack, lang, train_spec, eval_spec, cfg.eval_fraction, cfg.seed)
    except XlpeftError as exc:
        raise XlpeftError(f"{where}{exc}") from None
    limit = cfg.eval_batches * cfg.batch_size  # as for MLM blocks: a 6,689-sentence dev set costs minutes per eval
    if len(eval_ex) > limit:
        print(f"{where}evaluating on the first {limit} of {len(eval_ex)} evaluation examples (eval_batches="
              f"{cfg.eval_batches} x batch_size={cfg.batch_size}; raise --set eval_batches to use more)",
              file=sys.stderr, flush=True)
        eval_ex = eval_ex[:limit]
    return train_ex, eval_ex, data


def _plan_source(pack, lang: str, read: tuple[list, list, list], setting: str, cfg, base, method: str,
                 multi: bool) -> SourcePlan:
    """Resolve one source's language module and encode its training data; errors name the source."""
    where = f"source {lang}: " if multi else ""
    train_ex, eval_ex, data = read
    if multi and setting == "none":
        raise XlpeftError(f"{where}multi-source training swaps each source's language module in under the task "
                          "module, so every source needs one; got lang_module=none (train one with xlpeft train-lang "
                          f"--lang {lang}, or pass one per source: --set lang_module=A,B,...)")
    try:
        lang_module, lineage = language_module_for_task(setting, lang, base, method)
    except XlpeftError as exc:
        raise XlpeftError(f"{where}{exc}") from None
    if lang_module is not None:
        lang_module.check_base(base.fingerprint)
    tokenizer = tokenizer_for(base.tokenizer, [lang_module] if lang_module is not None else [])  # + its new words
    key = encoding_key(train_ex, tokenizer, list(pack.labels), pack.head, cfg.max_seq_len)
    train_enc, hit = cached_encoding(key, lambda: encode(pack, tokenizer, train_ex, cfg.max_seq_len,
                                                         purpose=f"{where}training data"))  # once per data + base
    if hit and train_enc.truncated:  # the warning encode() gives, from the cached counts
        warn_truncated(train_enc, len(train_ex), cfg.max_seq_len, f"{where}training data", default_label(pack))
    return SourcePlan(lang, train_ex, eval_ex, data, train_enc, lang_module, lineage, tokenizer)


def check_switchable(base, spec, sources: list[SourcePlan]) -> None:
    """Apply every source's language module the way training will, then take them off: refuse what cannot swap."""
    switch = LanguageSwitch(base, {s.lang: s.lang_module for s in sources}, verify=True)
    merged = switch.merged
    switch.remove()
    if merged and spec.trains_in_place:
        raise XlpeftError(
            f"multi-source: the {', '.join(merged)} language module(s) are merged into the base's weights, and a "
            f"{spec.name} task module trains those weights in place, so reverting a language delta between batches "
            "would undo the task's updates at the entries they share; use language modules that hook the base "
            "(adapter, compacter, parallel, mam, ia3, prefix, or lora with --set merge=false), or a task method "
            "that does not train in place (adapter, lora, ...)")


def plan_task(req: TaskRequest) -> TaskPlan:
    """Check everything and resolve the run's tags and params, before an MLflow run exists.

    ``xlpeft run`` calls it too, to tell whether a finished run already logged this configuration.
    """
    pack = load_task_pack(req.task)
    langs = source_languages(req.lang)
    names = [language_name(code) for code in langs]  # any ISO 639 code; an invalid one fails before data is read
    multi = len(langs) > 1
    spec = get_method(req.method)
    method_cfg, cfg, task_cfg = resolve_configs(req.method, "task", req.sets, TaskConfig)
    vocab_sets = [k for k in ("new_tokens", "new_token_unit", "new_token_min_count") if k in req.sets]
    if vocab_sets:  # a task module reads its language module's tokens; it adds none of its own
        raise ConfigError(f"--set {vocab_sets[0]}={req.sets[vocab_sets[0]]} is for language modules (train-lang); a "
                          "task module trains over the language module's vocabulary: drop it")
    stray = [k for k in MULTI_SOURCE_FIELDS if k in req.sets]
    if stray and not multi:
        raise XlpeftError(f"--set {stray[0]}: applies to multi-source training only (several --lang sources, e.g. "
                          f"--lang en,tr,id); got one source, --lang {req.lang}. Drop the setting or add sources")
    train_specs = per_source(req.train_data, langs, "--train-data")
    eval_specs = per_source(req.eval_data, langs, "--eval-data")
    settings = per_source(task_cfg.lang_module, langs, "lang_module")
    read = [_read_source(pack, lang, t, e, cfg, multi) for lang, t, e in zip(langs, train_specs, eval_specs, strict=True)]
    sizes = [len(train_ex) for train_ex, _, _ in read]
    probs = sampling_probabilities(sizes, task_cfg.sampling, task_cfg.temperature) if multi else [1.0]
    method_cfg = resolve_epochs(req.method, method_cfg, cfg, sum(sizes))  # LT-SFT's epoch-based phases -> steps
    out_dir = check_module_output(req.output or f"modules/task-{req.task}-{req.method}", "task", req.overwrite)
    base, device = start_training(req.base, cfg)
    cfg = fit_train_config(cfg, base, req.sets)  # max_seq_len within the base's position table
    spec.check(base, method_cfg, cfg)  # what the method checks against this base, before any run opens
    sources = [_plan_source(pack, lang, r, setting, cfg, base, req.method, multi)
               for lang, r, setting in zip(langs, read, settings, strict=True)]
    if multi:
        check_switchable(base, spec, sources)
    train_desc = [s.data[0].describe() for s in sources]
    first = sources[0]
    tags = {**run_tags("task", req.lang, " + ".join(names), req.task, req.method, base), **parent_tags(first.lineage)}
    task_params = asdict(task_cfg)
    if not multi:  # sampling means nothing for one source: its params stay those of earlier versions (runs stay done)
        task_params = {k: v for k, v in task_params.items() if k not in MULTI_SOURCE_FIELDS}
    params = {"method": asdict(method_cfg), "train": asdict(cfg), "task_config": task_params, "task": req.task,
              "lang": req.lang, "base": base.name, "train_data": ", ".join(train_desc),
              "train_data_fingerprint": data_fingerprint(*[d for s in sources for d in s.data]),
              "train_examples": sum(sizes), "eval_examples": sum(len(s.eval_ex) for s in sources),
              "lang_module": str(first.lineage or "none")}
    if multi:
        params["sources"] = ", ".join(f"{s.lang}: {len(s.train_ex)} examples, p={prob:.4f}, over "
                                      f"{s.lineage.get('registered_name') or s.lineage.get('path')}"
                                      for s, prob in zip(sources, probs, strict=True))
        params["lang_module"] = str([s.lineage for s in sources])
        tags["xlpeft.sources"] = req.lang

    dist = init_from_env(device)
    return TaskPlan(pack, spec, method_cfg, cfg, task_cfg, sources, train_desc, out_dir, base, device, dist,
                    req.registered_name, tags, params, probs)


def _batches(p: TaskPlan) -> ExampleBatches | SourceBatches:
    """The training batches: one source's, or every source's with a seeded draw of the source per batch."""
    pad, seed, size = p.base.tokenizer.pad_token_id, p.cfg.seed, p.cfg.batch_size
    if len(p.sources) == 1:
        s = p.sources[0]
        return ExampleBatches(s.train_enc, len(s.train_ex), size, pad, torch.Generator().manual_seed(seed))
    per_lang = {s.lang: ExampleBatches(s.train_enc, len(s.train_ex), size, pad,
                                       torch.Generator().manual_seed(seed + i))  # each source its own order
                for i, s in enumerate(p.sources)}
    return SourceBatches(per_lang, p.probs, torch.Generator().manual_seed(seed))


def _mean_over_sources(per_source: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the sources (the headline), and every source's own value (``<metric>_<lang>``)."""
    keys = next(iter(per_source.values())).keys()
    out = {k: sum(m[k] for m in per_source.values()) / len(per_source) for k in keys}
    out.update({f"{k}_{lang}": v for lang, m in per_source.items() for k, v in m.items()})
    return out


def train_task(req: TaskRequest) -> TaskResult:
    """Train, evaluate, save, log and register a task module (over one source language, or several)."""
    p = plan_task(req)  # ---- setup: everything checkable is checked before an MLflow run exists
    pack, spec, method_cfg, cfg, task_cfg, base, device, dist = (p.pack, p.spec, p.method_cfg, p.cfg, p.task_cfg,
                                                                 p.base, p.device, p.dist)
    first, multi = p.sources[0], len(p.sources) > 1
    name, tags, params, out_dir = p.registered_name, p.tags, p.params, p.out_dir

    # ---- train
    with training_run(f"task-{req.task}-{req.method}", tags, params, dist, req.resume, out_dir) as (
        tracker, ckpt_dir, checkpoint,
    ):
        tracker.log_inputs([record for s in p.sources  # the UI's Dataset column
                            for record in task_datasets(s.data, len(s.train_ex), len(s.eval_ex))])
        switch = LanguageSwitch(base, {s.lang: s.lang_module for s in p.sources}) if multi else None
        if switch is not None:
            switch.to(first.lang)  # the task module initialises over the first source's module, as with one source
        active = switch or (activate(base, [first.lang_module]) if first.lang_module is not None else None)
        torch.manual_seed(cfg.seed)
        head = build_head(pack.head, base.hidden_size, len(pack.labels), task_cfg.head_dropout).to(device)
        trainable = spec.prepare(base, method_cfg, cfg)
        data = _batches(p)

        dist.seed_dropout(cfg.seed)  # after the head and module are initialised identically on every rank

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            if switch is not None:
                switch.to(data.current)  # this batch's source language under the task module
            n_global = labelled_count(batch["labels"])  # the whole global batch's count, identical on every rank
            return task_loss(base, head, {k: dist.shard(v).to(device) for k, v in batch.items()}, n_global)

        def evaluate_source(s: SourcePlan) -> dict[str, float]:
            if switch is not None:
                switch.to(s.lang)
            return evaluate_task(base, head, pack, s.tokenizer, s.eval_ex, cfg.max_seq_len)

        def evaluate() -> dict[str, float]:
            if not multi:
                return {f"eval_{k}": v for k, v in evaluate_source(first).items()}
            per_source = {s.lang: evaluate_source(s) for s in p.sources}
            return {f"eval_{k}": v for k, v in _mean_over_sources(per_source).items()}

        base.model.train()
        head.train()
        run = PhaseRun(trainable, {"head": head}, data, {}, loss_fn, evaluate, cfg, tracker,
                       f"{req.task}/{req.lang}", ckpt_dir if dist.main else None, dist, model=base.model)
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
        sources = [{"lang": s.lang, "train_examples": len(s.train_ex), "probability": prob, "train_data": d,
                    "lang_module": s.lineage} for s, prob, d in zip(p.sources, p.probs, p.train_desc, strict=True)]
        manifest = Manifest(
            kind="task", method=req.method, lang=req.lang, task=req.task, base=base_ref(base),
            config=asdict(method_cfg),
            trainable_parameters=count_parameters(tensors, extra, skip=("head",)) + head_params,
            training={"steps": done, "phases": summary, "seed": cfg.seed, "train": asdict(cfg),
                      "world_size": dist.world, "train_data": p.train_desc, "metric": pack.metric, "eval": metrics,
                      **({"sources": sources, "sampling": task_cfg.sampling, "temperature": task_cfg.temperature}
                         if multi else {})},
            extra={**extra, "labels": list(pack.labels), "head": pack.head, "head_dropout": task_cfg.head_dropout,
                   "lang_module": first.lineage or None},  # the baseline's: the first source's module
        )
        version = publish(tracker, dist, out_dir, manifest, tensors, name, tags, done, ckpt_dir, spec.parents(extra))
    dist.close()
    return TaskResult(out_dir, tracker.run_id, name, version, {k.removeprefix("eval_"): v for k, v in metrics.items()},
                      " + ".join(s.lineage.get("registered_name") or s.lineage.get("path") or "none"
                                 for s in p.sources) if multi else
                      first.lineage.get("registered_name") or first.lineage.get("path"))
