"""``xlpeft compose``, ``xlpeft evaluate`` and ``xlpeft predict``: zero-shot transfer with composed modules."""

from __future__ import annotations

import json
import re
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xlpeft import tracking
from xlpeft.compose import compose
from xlpeft.composed import COMPOSITION_FILE, save_composed
from xlpeft.config import DEFAULT_BASE
from xlpeft.data.tasks import PairExample, TokenExample, parse_task_data, read_source
from xlpeft.errors import XlpeftError
from xlpeft.evaluation import EVAL_MAX_LEN, predict, score
from xlpeft.io import LoadedModule, install_dir, load_module
from xlpeft.metrics import METRICS
from xlpeft.models import fit_seq_len, load_base
from xlpeft.packs import TaskPack, load_task_pack
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


def resolve(kind: str, name: str, method: str | None, fingerprint: str) -> tuple[LoadedModule, tracking.RegisteredModule]:
    path, reg = tracking.find_module(kind, name, method, fingerprint=fingerprint)
    return load_module(path), reg


def eval_examples(pack: TaskPack, lang: str, spec: str | None,
                  split: str | None = None) -> tuple[list | None, str | None]:
    """--eval-data, else the pack's ``split`` (default test, else validation) for ``lang``, else nothing."""
    if spec:
        source = parse_task_data(spec)
    elif split:
        source = pack.source(lang, split)
    else:
        splits = pack.sources.get(lang, {})
        split = next((s for s in ("test", "validation") if s in splits), None)
        if split is None:
            return None, None
        source = splits[split]
    return read_source(source, pack.head, list(pack.labels)), source.describe()


def baseline_language_module(task: LoadedModule, fingerprint: str) -> LoadedModule | None:
    """The source-language module the task module was trained over: its recorded parent, never a fresh lookup.

    A lookup ("newest English module") could return a module registered after the task module
    was trained, or one of another method, and the baseline would no longer be the model that
    was trained. None when the task module was trained without one, or its parent is gone.
    """
    lineage = task.manifest.extra.get("lang_module") or {}
    if lineage.get("registered_name"):
        match = [v for v in tracking.list_versions(lineage["registered_name"]) if v.version == lineage.get("version")
                 and v.tags.get("xlpeft.base_fingerprint", fingerprint) == fingerprint]
        if match:
            return load_module(tracking.download(match[0])[0])
    if lineage.get("path") and Path(lineage["path"]).is_dir():
        return load_module(lineage["path"])
    return None


def baseline_stack(task: LoadedModule, fingerprint: str) -> list[LoadedModule]:
    """The zero-shot reference of MAD-X (Pfeiffer et al., 2020): the task module over its source-language module.

    Just the task module when that language module can no longer be found.
    """
    source = baseline_language_module(task, fingerprint)
    return [task] if source is None else [source, task]


def evaluate_model(model, pack: TaskPack, tokenizer, examples: list) -> dict[str, float]:
    device = next(model.parameters()).device
    max_len = fit_seq_len(EVAL_MAX_LEN, model, explicit=False)  # long sentences are cut with a warning
    preds = predict(lambda b: model(**b).logits, pack, tokenizer, examples, device, max_len=max_len)
    return score(pack, examples, preds)


def compose_task(req: ComposeRequest) -> ComposeResult:
    """Compose target-language + task modules, evaluate zero-shot against the source-language baseline, log it."""
    pack = load_task_pack(req.task)
    base = load_base(req.base)
    lang_mod, lang_reg = resolve("language", req.lang, req.lang_method, base.fingerprint)
    task_mod, task_reg = resolve("task", req.task, req.task_method, base.fingerprint)
    examples, evaluated_on = eval_examples(pack, req.lang, req.eval_data, req.split)
    overlap = {}
    spec = get_method(task_mod.manifest.method)
    if lang_mod.manifest.method == spec.name and spec.overlap is not None:  # e.g. two deltas: shared entries add up
        overlap = spec.overlap(lang_mod, task_mod)
    key = METRICS[pack.metric]
    methods = f"{lang_mod.manifest.method}+{task_mod.manifest.method}"
    tags = {
        "xlpeft.kind": "composition", "xlpeft.lang": req.lang, "xlpeft.task": req.task, "xlpeft.method": methods,
        "xlpeft.base": base.name, "xlpeft.base_fingerprint": base.fingerprint,
        "xlpeft.parent.lang_run": lang_reg.run_id, "xlpeft.parent.task_run": task_reg.run_id,
        "xlpeft.parent.lang_module": f"{lang_reg.name}@{lang_reg.version}",
        "xlpeft.parent.task_module": f"{task_reg.name}@{task_reg.version}",
    }
    params = {"lang": req.lang, "task": req.task, "base": base.name, "lang_module": f"{lang_reg.name}@{lang_reg.version}",
              "task_module": f"{task_reg.name}@{task_reg.version}", "eval_data": evaluated_on or "none"}
    with tracking.tracked_run(f"compose-{req.lang}-{req.task}-{methods}", tags, params) as tracker:
        if overlap:
            tracker.log_metrics({f"overlap_{k}": v for k, v in overlap.items()} | {"overlap_total": sum(overlap.values())}, 0)
        model = compose(base, [lang_mod, task_mod])
        metrics, baseline, baseline_lang = {}, {}, None
        if examples is not None:
            metrics = evaluate_model(model, pack, base.tokenizer, examples)
            tracker.log_metrics({f"eval_{k}": v for k, v in metrics.items()}, 0)
            reference = baseline_stack(task_mod, base.fingerprint)
            baseline = evaluate_model(compose(base, reference), pack, base.tokenizer, examples)
            baseline_lang = reference[0].manifest.lang if len(reference) > 1 else None
            tracker.log_metrics({f"baseline_{k}": v for k, v in baseline.items()}, 0)
            tracker.set_tags({"xlpeft.baseline_lang": baseline_lang or "none"})
        out = Path(req.output) if req.output else None
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "composed"  # written whole, then copied: never mixed into another directory
            save_composed(model, target, base.tokenizer)
            tracker.log_artifacts(target, "composed")
            if out is not None:
                out = install_dir(target, out, COMPOSITION_FILE, "an earlier composed model")
    return ComposeResult(tracker.run_id, key, metrics, baseline, baseline_lang, out, overlap, evaluated_on)


BASELINE = "baseline"


@dataclass
class Matrix:
    """Zero-shot scores: rows are languages, columns ``lang_method+task_method`` and ``baseline+task_method``."""

    metric: str
    rows: dict[str, dict[str, float]]
    skipped: dict[str, str]
    baseline_langs: dict[str, str] = field(default_factory=dict)  # task method -> its source language

    def columns(self) -> list[str]:
        """``lang_method+task_method`` columns, then the ``baseline+task_method`` columns."""
        cols = {c for r in self.rows.values() for c in r}
        return sorted(c for c in cols if not c.startswith(BASELINE)) + sorted(c for c in cols if c.startswith(BASELINE))

    def format(self) -> str:
        cols = self.columns()
        w = max([len(c) + 2 for c in cols] + [10])
        lines = [f"{self.metric:<8}" + "".join(f"{c:>{w}}" for c in cols)]
        for lang, row in self.rows.items():
            lines.append(f"{lang:<8}" + "".join(f"{row[c]:>{w}.4f}" if c in row else f"{'-':>{w}}" for c in cols))
        if self.rows:
            lines += [f"{BASELINE}+{tm}: the {tm} task module over its own source-language module ({src}), "
                      "no target-language module" for tm, src in self.baseline_langs.items()]
        lines += [f"{lang}: skipped ({why})" for lang, why in self.skipped.items()]
        return "\n".join(lines)


def registered_by_method(kind: str, name: str, fingerprint: str) -> dict[str, LoadedModule]:
    """The newest registered ``kind`` module for ``name`` of every method that has one, keyed by method."""
    from xlpeft.registry import method_names

    found = {}
    for method in method_names():
        try:
            found[method] = resolve(kind, name, method, fingerprint)[0]
        except XlpeftError:
            continue
    return found


def matrix_examples(pack: TaskPack, lang: str, eval_dir: str | None, split: str | None) -> tuple[list | None, str]:
    """Evaluation examples for one row: ``eval_dir/<lang>[.test].conll``, else the pack's; or why there are none."""
    local = next((Path(eval_dir) / f"{lang}{suffix}" for suffix in (".conll", ".test.conll")
                  if eval_dir and (Path(eval_dir) / f"{lang}{suffix}").is_file()), None)
    if local is None and split and split not in pack.sources.get(lang, {}):
        return None, f"the {pack.task} pack has no {split} split for {lang}"
    try:
        examples, _ = eval_examples(pack, lang, str(local) if local else None, split)
    except XlpeftError as exc:  # e.g. the pack's hub dataset while offline: report it, keep the other rows
        return None, str(exc)
    return examples, "" if examples is not None else f"no {pack.task} evaluation data for {lang}"


def evaluate_matrix(task: str, langs: list[str], base_name: str, eval_dir: str | None = None,
                    split: str | None = None) -> tuple[Matrix, str]:
    """Every registered language module for ``langs`` with every task module for ``task``: a transfer matrix."""
    pack = load_task_pack(task)
    base = load_base(base_name)
    key = METRICS[pack.metric]
    task_mods = registered_by_method("task", task, base.fingerprint)
    if not task_mods:
        resolve("task", task, None, base.fingerprint)  # raises with the registry listing
    matrix = Matrix(key, {}, {})
    references = {tm: baseline_stack(mod, base.fingerprint) for tm, mod in task_mods.items()}
    matrix.baseline_langs = {tm: (ref[0].manifest.lang or "?") if len(ref) > 1 else "none"
                             for tm, ref in references.items()}
    for lang in langs:
        lang_mods = registered_by_method("language", lang, base.fingerprint)
        if not lang_mods:
            matrix.skipped[lang] = f"no language module registered for {lang} on this base"
            continue
        examples, why = matrix_examples(pack, lang, eval_dir, split)
        if examples is None:
            matrix.skipped[lang] = why
            continue
        row = {}
        for tm, task_mod in task_mods.items():
            for lm, lang_mod in lang_mods.items():
                row[f"{lm}+{tm}"] = evaluate_model(compose(base, [lang_mod, task_mod]), pack, base.tokenizer,
                                                   examples)[key]
            row[f"{BASELINE}+{tm}"] = evaluate_model(compose(base, references[tm]), pack, base.tokenizer,
                                                     examples)[key]
        matrix.rows[lang] = row
    if not matrix.rows:  # nothing to show: say why, and open no run
        why = "; ".join(f"{lang}: {reason}" for lang, reason in matrix.skipped.items())
        raise XlpeftError(f"nothing to evaluate for {task}: every language was skipped ({why[:600]})")
    tags = {"xlpeft.kind": "composition", "xlpeft.task": task, "xlpeft.lang": ",".join(langs),
            "xlpeft.method": "matrix", "xlpeft.base": base.name, "xlpeft.base_fingerprint": base.fingerprint}
    with tracking.tracked_run(f"evaluate-{task}", tags, {"task": task, "langs": ",".join(langs)}) as tracker:
        with tempfile.TemporaryDirectory() as tmp:
            summary = {"metric": key, "rows": matrix.rows, "skipped": matrix.skipped,
                       "baseline_langs": matrix.baseline_langs}
            (Path(tmp) / "matrix.json").write_text(json.dumps(summary, indent=2))
            (Path(tmp) / "matrix.txt").write_text(matrix.format() + "\n")
            if matrix.rows:
                heatmap(matrix, Path(tmp) / "matrix.png", f"zero-shot {task} ({key})")
            tracker.log_artifacts(Path(tmp), "evaluation")
        for lang, row in matrix.rows.items():
            tracker.log_metrics({f"{key}_{lang}_{c.replace('+', '_')}": v for c, v in row.items()}, 0)
    return matrix, tracker.run_id


def heatmap(matrix: Matrix, path: Path, title: str) -> None:
    """A language x method heat-map PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, langs = matrix.columns(), list(matrix.rows)
    values = [[matrix.rows[lang].get(c, float("nan")) for c in cols] for lang in langs]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(cols), 1.2 + 0.6 * len(langs)))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(langs)), langs)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v != v else f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]", re.UNICODE)


def tokenize_words(line: str) -> list[str]:
    """Split raw text into words and punctuation (Unicode-aware, so Ge'ez and Latin scripts both work).

    Invisible format characters (Unicode category Cf: zero-width space and joiners, soft hyphen,
    BOM, direction marks and isolates) are dropped first: as tokens of their own they would shift
    every later tag.
    """
    visible = "".join(ch for ch in line if unicodedata.category(ch) != "Cf")
    return WORD.findall(visible)


def predict_lines(lang: str, task: str, base_name: str, lines: list[str], lang_method: str | None = None,
                  task_method: str | None = None) -> list[Any]:
    """Tag raw lines (token tasks) or classify ``premise<TAB>hypothesis`` lines (NLI) with the composed model."""
    pack = load_task_pack(task)
    base = load_base(base_name)
    lang_mod, _ = resolve("language", lang, lang_method, base.fingerprint)
    task_mod, _ = resolve("task", task, task_method, base.fingerprint)
    model = compose(base, [lang_mod, task_mod])
    fallback = pack.labels[0]
    if pack.head == "token_classification":
        words = [tokenize_words(line) for line in lines]
        examples = [TokenExample(tuple(w), (fallback,) * len(w)) for w in words]
        keep = [i for i, w in enumerate(words) if w]
    else:
        pairs = [line.split("\t", 1) for line in lines]
        bad = next((n for n, (line, p) in enumerate(zip(lines, pairs, strict=True), 1) if line.strip() and len(p) != 2),
                   None)
        if bad is not None:
            raise XlpeftError(f"{task} prediction reads `premise<TAB>hypothesis` lines; line {bad} has no tab")
        examples = [PairExample(p[0], p[1], fallback) if len(p) == 2 else PairExample("", "", fallback) for p in pairs]
        keep = [i for i, line in enumerate(lines) if line.strip()]
    with torch.no_grad():
        preds = predict(lambda b: model(**b).logits, pack, base.tokenizer, [examples[i] for i in keep],
                        next(model.parameters()).device, max_len=fit_seq_len(EVAL_MAX_LEN, model, explicit=False))
    out: list[Any] = [[] if pack.head == "token_classification" else "" for _ in lines]  # a blank line: an empty block
    for i, pred in zip(keep, preds, strict=True):
        out[i] = pred
    return list(zip(examples, out, strict=True))
