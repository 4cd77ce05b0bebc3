"""``xlpeft evaluate``: every registered language module for the languages with every task module for the task.

Each language's and each task's modules are resolved once; the matrix, its baseline column and
the heat-map come from :mod:`xlpeft.matrix`; the table and the figure go to one MLflow run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from xlpeft import tracking
from xlpeft.errors import XlpeftError
from xlpeft.lineage import baseline_stack, registered_by_method
from xlpeft.matrix import Matrix, baseline_langs, matrix_examples, matrix_row
from xlpeft.metrics import METRICS
from xlpeft.models import load_base
from xlpeft.packs import load_task_pack


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
        matrix.rows[lang] = matrix_row(base, pack, examples, task_mods, lang_mods, references)
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
        for lang, row in matrix.rows.items():
            tracker.log_metrics({f"{key}_{lang}_{c.replace('+', '_')}": v for c, v in row.items()}, 0)
    return matrix, tracker.run_id
