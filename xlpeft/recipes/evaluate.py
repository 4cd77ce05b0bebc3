"""``xlpeft evaluate``: every registered language module for the languages with every task module for the task.

With ``--modules-dir``, the modules saved under a folder instead, one matrix per seed, reported as
mean ± std over seeds (:mod:`xlpeft.seeds`).

Each language's and each task's modules are resolved once, each language's examples are encoded
once, and every cell is scored in place on the one base (:class:`xlpeft.matrix.Scorer`); the
matrix, its baseline column and the heat-map come from :mod:`xlpeft.matrix`; the table and the
figure go to one MLflow run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from xlpeft import tracking
from xlpeft.errors import XlpeftError
from xlpeft.lineage import baseline_stack, modules_under, registered_by_method
from xlpeft.matrix import Matrix, Scorer, baseline_langs, matrix_examples, matrix_row
from xlpeft.metrics import METRICS
from xlpeft.models import load_base
from xlpeft.packs import load_task_pack
from xlpeft.seeds import SeedTable, group_by_seed, seed_matrix

TABLE_FILE = "evaluation/matrix_table.json"  # the matrix in MLflow's table format (mlflow.log_table's JSON)


def seed_table_rows(table: SeedTable) -> tuple[list[str], list[list[float | str | None]]]:
    """(columns, rows) of an MLflow table for a seed table: ``lang``, then each cell's mean and std over seeds."""
    cols = table.columns()
    header = ["lang", *(f"{c} {stat}" for c in cols for stat in ("mean", "std"))]
    rows = []
    for lang, row in table.values.items():
        rows.append([lang, *(x for c in cols for x in (table.stats(lang, c)[:2] if c in row else (None, None)))])
    return header, rows


def evaluate_matrix(task: str, langs: list[str], base_name: str, eval_dir: str | None = None,
                    split: str | None = None) -> tuple[Matrix, str]:
    """Every registered language module for ``langs`` with every task module for ``task``: a transfer matrix.

    Returns:
        (the matrix, the MLflow run id it was logged to).

    Raises:
        XlpeftError: no task module is registered for ``task`` on this base, or every language was skipped
            (no run is opened then).
    """
    # ---- resolve: each module once
    pack = load_task_pack(task)
    base = load_base(base_name)
    key = METRICS[pack.metric]
    task_mods = registered_by_method("task", task, base.fingerprint)
    if not task_mods:  # nothing of any method: the lookup's own error lists what the registry holds
        tracking.find_module("task", task, fingerprint=base.fingerprint, fetch=False)
    references = {tm: baseline_stack(mod, base.fingerprint) for tm, mod in task_mods.items()}
    matrix = Matrix(key, {}, {}, baseline_langs(references))
    scorer = Scorer(base)  # one model per task head for every cell; modules swapped in place

    # ---- evaluate, row by row
    for lang in langs:
        lang_mods = registered_by_method("language", lang, base.fingerprint)
        if not lang_mods:
            matrix.skipped[lang] = f"no language module registered for {lang} on this base"
            continue
        examples, why = matrix_examples(pack, lang, eval_dir, split)
        if examples is None:
            matrix.skipped[lang] = why
            continue
        matrix.rows[lang] = matrix_row(scorer, scorer.prepare(pack, examples), task_mods, lang_mods, references)
    scorer.close()
    if not matrix.rows:  # nothing to show: say why, and open no run
        why = "; ".join(f"{lang}: {reason}" for lang, reason in matrix.skipped.items())
        raise XlpeftError(f"nothing to evaluate for {task}: every language was skipped ({why[:600]})")

    # ---- log
    tags = {"xlpeft.kind": "composition", "xlpeft.task": task, "xlpeft.lang": ",".join(langs),
            "xlpeft.method": "matrix", "xlpeft.base": base.name, "xlpeft.base_fingerprint": base.fingerprint}
    with tracking.tracked_run(f"evaluate-{task}", tags, {"task": task, "langs": ",".join(langs)}) as tracker:
        with tempfile.TemporaryDirectory() as tmp:
            matrix.save(Path(tmp), f"zero-shot {task} ({key})")
            tracker.log_artifacts(Path(tmp), "evaluation")
        tracker.log_table(*matrix.table(), TABLE_FILE)  # rendered on the run page, next to the heat-map
        for lang, row in matrix.rows.items():
            tracker.log_metrics({f"{key}_{lang}_{c.replace('+', '_')}": v for c, v in row.items()}, 0)
    return matrix, tracker.run_id


def evaluate_seeds(task: str, langs: list[str], base_name: str, modules_dir: str, source: str | None = None,
                   eval_dir: str | None = None, split: str | None = None,
                   report: str | None = None) -> tuple[SeedTable, str, list[str]]:
    """The transfer matrix of every seed whose modules are saved under ``modules_dir``: mean ± std per cell.

    Args:
        source: the language the zero-shot task modules were trained on (default: the one language of the
            ``task`` task modules that is not a target).
        report: a folder to write the table files into as well (for scripts such as benchmarks/transfer_pos.py).

    Returns:
        (the table, the MLflow run id, notes: modules skipped as trained on another base).

    Raises:
        XlpeftError: no module for this base under ``modules_dir``, no (or no single) source language, or every
            language was skipped (no run is opened then).
    """
    # ---- resolve: modules by seed, the source language, every row's examples once
    pack = load_task_pack(task)
    base = load_base(base_name)
    key = METRICS[pack.metric]
    modules, notes = modules_under(modules_dir, base.fingerprint)
    groups = group_by_seed(modules, task)
    sources = sorted({lang for g in groups.values() for lang, _ in g.task_mods} - set(langs))
    if source is None:
        if len(sources) != 1:
            raise XlpeftError(f"--modules-dir {modules_dir}: expected {task} task modules trained on one source language "
                              f"besides the targets {', '.join(langs)}; found {', '.join(sources) or 'none'}. "
                              "Pass --source LANG, or train one with `xlpeft train-task`")
        source = sources[0]
    scorer = Scorer(base)  # one model per task head for every seed's cells; modules swapped in place
    rows, skipped = {}, {}
    for lang in langs:
        examples, why = matrix_examples(pack, lang, eval_dir, split)
        if examples is None:
            skipped[lang] = why
        else:
            rows[lang] = scorer.prepare(pack, examples)  # encoded once for every seed

    # ---- evaluate, seed by seed
    matrices = {}
    for seed, group in groups.items():
        print(f"seed {seed}: scoring {len(group.lang_mods)} language and {len(group.task_mods)} task modules",
              file=sys.stderr, flush=True)
        matrices[seed] = seed_matrix(scorer, pack, group, source, rows)
        matrices[seed].skipped.update(skipped)
    scorer.close()
    table = SeedTable.of(matrices)
    if not table.values:
        why = "; ".join(f"{lang}: {reason}" for lang, reason in table.skipped.items())
        raise XlpeftError(f"nothing to evaluate for {task}: every language was skipped ({why[:600]})")

    # ---- log
    tags = {"xlpeft.kind": "composition", "xlpeft.task": task, "xlpeft.lang": ",".join(langs),
            "xlpeft.method": "matrix-seeds", "xlpeft.base": base.name, "xlpeft.base_fingerprint": base.fingerprint,
            "xlpeft.source_lang": source}
    params = {"task": task, "langs": ",".join(langs), "modules_dir": str(Path(modules_dir).resolve()),
              "seeds": ",".join(map(str, table.seeds)), "source": source}
    title = f"zero-shot {task} from {source} ({key}, mean of {len(table.seeds)} seeds)"
    with tracking.tracked_run(f"evaluate-{task}-seeds", tags, params) as tracker:
        with tempfile.TemporaryDirectory() as tmp:
            table.save(Path(tmp), title)
            tracker.log_artifacts(Path(tmp), "evaluation")
        tracker.log_table(*seed_table_rows(table), TABLE_FILE)
        if report:
            Path(report).mkdir(parents=True, exist_ok=True)
            table.save(Path(report), title)
        for lang, row in table.values.items():
            for col in row:
                mean, std, _ = table.stats(lang, col)
                name = f"{key}_{lang}_{col.replace('+', '_')}"
                tracker.log_metrics({f"{name}_mean": mean, f"{name}_std": std}, 0)
    return table, tracker.run_id, notes
