"""The zero-shot transfer matrix: target languages x method pairs, with each task module's baseline.

A cell ``lang_method+task_method`` scores the target language's module under the task module;
a ``baseline+task_method`` column scores the task module over its own source-language module
(no target-language module), the reference each cell should beat (MAD-X, Pfeiffer et al., 2020).
Cells are scored by a :class:`Scorer`: one model per task head for the whole command, modules
swapped in place, each language's examples encoded once; the scores are ``compose``'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from xlpeft.composed import InPlace
from xlpeft.errors import XlpeftError
from xlpeft.evaluation import EvalSet, eval_examples, eval_set, evaluate_set, model_max_len
from xlpeft.io import LoadedModule
from xlpeft.metrics import METRICS
from xlpeft.packs import TaskPack
from xlpeft.vocab import composition_vocab

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
        """The table as text, with a line per baseline column and per skipped language."""
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

    def table(self) -> tuple[list[str], list[list[float | str | None]]]:
        """(columns, rows) for an MLflow table: ``lang`` then :meth:`columns`; a missing cell is None."""
        cols = self.columns()
        return ["lang", *cols], [[lang, *(row.get(c) for c in cols)] for lang, row in self.rows.items()]

    def save(self, directory: Path, title: str) -> None:
        """``matrix.json``, ``matrix.txt`` and (with rows) the heat-map ``matrix.png`` into ``directory``."""
        summary = {"metric": self.metric, "rows": self.rows, "skipped": self.skipped,
                   "baseline_langs": self.baseline_langs}
        (directory / "matrix.json").write_text(json.dumps(summary, indent=2))
        (directory / "matrix.txt").write_text(self.format() + "\n")
        if self.rows:
            heatmap(self, directory / "matrix.png", title)


def baseline_langs(references: dict[str, list[LoadedModule]]) -> dict[str, str]:
    """Task method -> the source language its baseline runs over ("none" for a task module on the bare base)."""
    return {tm: (ref[0].manifest.lang or "?") if len(ref) > 1 else "none" for tm, ref in references.items()}


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


class Scorer:
    """Scores compositions on one base: each language's examples prepared once, modules swapped in place.

    The per-cell work of ``evaluate_model(compose(base, modules), ...)`` less what does not change
    between cells: the model of a task head is built once and a cell applies only the modules that
    differ from the previous cell's (:class:`~xlpeft.composed.InPlace`); the examples are encoded,
    sorted by length and padded once (:func:`~xlpeft.evaluation.eval_set`). Same scores.
    """

    def __init__(self, base) -> None:
        self.base = base
        self.in_place = InPlace(base)
        self.max_len = model_max_len(base.model)  # a task model of this base embeds as many positions

    def prepare(self, pack: TaskPack, examples: list) -> EvalSet:
        """``examples`` encoded and batched for every cell of their row (and every seed)."""
        return eval_set(pack, self.base.tokenizer, examples, max_len=self.max_len)

    def score(self, modules: list[LoadedModule], data: EvalSet) -> float:
        """The pack's headline metric of ``modules`` (bottom first, task module last) on ``data``.

        A language module that adds new tokens needs its own encoding of the examples, with the
        composition's tokenizer: that cell is composed on its own (after the in-place modules are
        removed) and removed again, so the next cell starts from the bare base as usual.
        """
        if composition_vocab(modules) is not None:
            from xlpeft.compose import compose

            self.in_place.close()
            model = compose(self.base, modules)
            try:
                own = eval_set(data.pack, model.xlpeft_tokenizer, data.examples, max_len=data.max_len)
                return evaluate_set(model, own)[METRICS[data.pack.metric]]
            finally:
                model.xlpeft_active.remove()
        with self.in_place.composed(modules) as model:
            return evaluate_set(model, data)[METRICS[data.pack.metric]]

    def close(self) -> None:
        """Remove the modules still applied (the models are the bare base with a head again)."""
        self.in_place.close()


def matrix_row(scorer: Scorer, data: EvalSet, task_mods: dict[str, LoadedModule], lang_mods: dict[str, LoadedModule],
               references: dict[str, list[LoadedModule]]) -> dict[str, float]:
    """One language's scores: every language module under every task module, and each task module's baseline.

    Args:
        data: the language's examples, prepared once (:meth:`Scorer.prepare`).
        task_mods, lang_mods: loaded modules by method (resolved once per command, not per cell).
        references: task method -> its baseline stack (:func:`xlpeft.lineage.baseline_stack`).
    """
    cells: dict[str, list[LoadedModule]] = {}
    for tm, task_mod in task_mods.items():
        for lm, lang_mod in lang_mods.items():
            cells[f"{lm}+{tm}"] = [lang_mod, task_mod]
        cells[f"{BASELINE}+{tm}"] = references[tm]
    # cells sharing their bottom module run one after another, so it stays applied while the task modules swap
    # on top (Scorer keeps what consecutive compositions share); the order changes no score
    scores = {name: scorer.score(cells[name], data) for name in sorted(cells, key=lambda n: [id(m) for m in cells[n]])}
    return {name: scores[name] for name in cells}


def heatmap(matrix: Matrix, path: Path, title: str, columns: list[str] | None = None) -> None:
    """A language x method heat-map PNG (matplotlib, no display needed), columns in ``matrix.columns()`` order or ``columns``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, langs = columns or matrix.columns(), list(matrix.rows)
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
