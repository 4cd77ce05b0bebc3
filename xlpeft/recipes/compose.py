"""``xlpeft compose``: a target-language module (+ extra modules) under a task module, scored zero-shot.

MAD-X / LT-SFT transfer (Pfeiffer et al., 2020; Ansell et al., 2022): the task module trained over
the source language's module is composed with the *target* language's module instead. Every module
is resolved once, the composition is built (and validated) before anything is applied, and the
score is compared with the baseline: the task module over its own recorded source-language module.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from xlpeft import tracking
from xlpeft.compose import Composition, ModuleRef, compose, resolve_module
from xlpeft.composed import COMPOSITION_FILE, check_head, save_composed
from xlpeft.config import DEFAULT_BASE
from xlpeft.errors import XlpeftError
from xlpeft.evaluation import eval_examples, evaluate_model
from xlpeft.io import install_dir
from xlpeft.lineage import baseline_stack, registered_ref
from xlpeft.metrics import METRICS
from xlpeft.models import load_base
from xlpeft.packs import TaskPack, language_name, load_task_pack
from xlpeft.registry import get_method


@dataclass(frozen=True)
class ComposeRequest:
    lang: str
    task: str
    base: str = DEFAULT_BASE
    lang_method: str | None = None
    task_method: str | None = None
    eval_data: str | None = None
    output: str | None = None
    split: str | None = None  # a split of the task pack for --lang (default: test, else validation)
    modules: tuple[str, ...] = ()  # --module: directories or NAME[@VERSION], stacked between language and task, bottom first
    adapter_drop: int = 0  # --adapter-drop: adapter-like modules skip the lowest N layers (AdapterDrop, Rücklé et al. 2021)
    register: bool = False  # --register: log the composition as an MLflow Model, registered as xlpeft-<task>-<lang>
    module_lang: str | None = None  # --fallback related: the language whose module stands in for --lang (it has none)
    fallback: str = ""  # why module_lang was chosen (xlpeft.recipes.fallback), logged as the run's xlpeft.fallback tag


@dataclass
class ComposeResult:
    run_id: str
    metric: str
    metrics: dict[str, float]
    baseline: dict[str, float]
    baseline_lang: str | None
    output: Path | None
    overlap: dict[str, int] = field(default_factory=dict)
    evaluated_on: str | None = None
    registered_name: str | None = None
    version: str | None = None


def check_task_module(task: ModuleRef, pack: TaskPack, hidden_size: int) -> None:
    """A task module must carry a head that fits the base and the pack's labels (scored by index, in the pack's order).

    Raises:
        XlpeftError: no head or labels, a head of another shape, or another number of labels than the pack.
    """
    check_head(task.module, hidden_size)
    labels = task.module.manifest.extra["labels"]
    if len(labels) != len(pack.labels):
        raise XlpeftError(f"task module {task.source} predicts {len(labels)} labels ({', '.join(map(str, labels[:8]))}), "
                          f"but the {pack.task} pack has {len(pack.labels)} ({', '.join(pack.labels[:8])}); "
                          f"compose a task module trained on the {pack.task} pack")


def overlap_of(lang: ModuleRef, task: ModuleRef) -> dict[str, int]:
    """Entries two modules of one method both change (e.g. two deltas, whose shared entries add up); else empty."""
    spec = get_method(task.method)
    if lang.method != spec.name or spec.overlap is None:
        return {}
    return spec.overlap(lang.module, task.module)


def compose_task(req: ComposeRequest) -> ComposeResult:
    """Compose target-language (+ extra) and task modules, evaluate zero-shot against the baseline, log it."""
    # ---- resolve every module once, and build the composition before anything is applied
    pack = load_task_pack(req.task)
    lang_name = language_name(req.lang)  # any ISO 639 code, with or without a language pack
    base = load_base(req.base)
    lang, lang_reg = registered_ref("language", req.module_lang or req.lang, req.lang_method, base.fingerprint)
    task, task_reg = registered_ref("task", req.task, req.task_method, base.fingerprint)
    extra = [resolve_module(ref, base.fingerprint, base) for ref in req.modules]
    composition = dataclasses.replace(Composition.of([lang, *extra, task], base.fingerprint),
                                      adapter_drop=req.adapter_drop)  # the baseline below runs without it
    check_task_module(task, pack, base.hidden_size)
    examples, evaluated_on = eval_examples(pack, req.lang, req.eval_data, req.split)
    overlap = overlap_of(lang, task)
    methods = composition.methods()
    tags = {
        "xlpeft.kind": "composition", "xlpeft.lang": req.lang, "xlpeft.task": req.task, "xlpeft.method": methods,
        "xlpeft.base": base.name, "xlpeft.base_fingerprint": base.fingerprint,
        "xlpeft.parent.lang_run": lang_reg.run_id, "xlpeft.parent.task_run": task_reg.run_id,
        "xlpeft.parent.lang_module": lang.source, "xlpeft.parent.task_module": task.source,
        "xlpeft.composition": composition.describe(), "xlpeft.lang_name": lang_name,
    }
    if req.module_lang:
        tags |= {"xlpeft.lang_module_lang": req.module_lang, "xlpeft.fallback": req.fallback[:5000]}
    if extra:
        tags["xlpeft.parent.modules"] = ", ".join(m.source for m in extra)
    params = {"lang": req.lang, "task": req.task, "base": base.name, "lang_module": lang.source,
              "task_module": task.source, "modules": ", ".join(m.source for m in extra) or "none",
              "eval_data": evaluated_on or "none", "adapter_drop": req.adapter_drop}

    # ---- compose, evaluate against the baseline, save
    with tracking.tracked_run(f"compose-{req.lang}-{req.task}-{methods}", tags, params) as tracker:
        if overlap:
            tracker.log_metrics({f"overlap_{k}": v for k, v in overlap.items()} | {"overlap_total": sum(overlap.values())}, 0)
        model = compose(base, composition)
        metrics, baseline, baseline_lang = {}, {}, None
        if examples is not None:
            metrics = evaluate_model(model, pack, model.xlpeft_tokenizer, examples)
            tracker.log_metrics({f"eval_{k}": v for k, v in metrics.items()}, 0)
            reference = baseline_stack(task.module, base.fingerprint)  # the task module over its recorded parent
            reference_model = compose(base, reference)
            baseline = evaluate_model(reference_model, pack, reference_model.xlpeft_tokenizer, examples)
            baseline_lang = reference[0].manifest.lang if len(reference) > 1 else None
            tracker.log_metrics({f"baseline_{k}": v for k, v in baseline.items()}, 0)
            tracker.set_tags({"xlpeft.baseline_lang": baseline_lang or "none"})
        out = Path(req.output) if req.output else None
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "composed"  # written whole, then copied: never mixed into another directory
            save_composed(model, target, model.xlpeft_tokenizer)  # with a language module's new words, if any
            tracker.log_artifacts(target, "composed")
            if out is not None:
                out = install_dir(target, out, COMPOSITION_FILE, "an earlier composed model")
            registered = register_composition(tracker, composition, base, tags, Path(tmp)) if req.register else None
    return ComposeResult(tracker.run_id, METRICS[pack.metric], metrics, baseline, baseline_lang, out, overlap,
                         evaluated_on, *(registered or (None, None)))


def register_composition(tracker, composition: Composition, base, tags: dict[str, str],
                         tmp: Path) -> tuple[str, str]:
    """Log the composition as an MLflow Model (artifact ``model``) and register it as ``xlpeft-<task>-<lang>``.

    The model holds every leaf's module folder, so loading or serving it never needs the parents'
    registry entries; the version's tags name both parents (``xlpeft.parent.*``).
    """
    from xlpeft.tracking.flavor import write_composition_model

    parents = {k: v for k, v in tags.items() if k.startswith("xlpeft.parent.")}
    write_composition_model(tmp / "model", composition, base, parents)
    tracker.log_artifacts(tmp / "model", "model")
    name = f"xlpeft-{tags['xlpeft.task']}-{tags['xlpeft.lang']}"
    version_tags = {k: v for k, v in tags.items() if k.startswith(("xlpeft.parent.", "xlpeft.kind", "xlpeft.base",
                                                                    "xlpeft.method", "xlpeft.lang", "xlpeft.task"))}
    return name, tracker.register(name, "model", version_tags, description=tracking.composition_description(tags, name))
