"""Transfer tables over seeds: one matrix per seed from a folder of saved modules, then mean ± std per cell.

A single seed cannot say whether a target-language module helps: the difference from the
baseline can be smaller than what another seed moves it by. ``xlpeft evaluate --modules-dir DIR``
reads every module saved under ``DIR`` (e.g. by ``pipelines/pos-universal.yaml``), groups them by
the seed recorded in their manifests, scores each seed's matrix (:mod:`xlpeft.matrix`), and
reports each cell as mean ± sample standard deviation over seeds with its difference from the
baseline of the same task method. A difference "exceeds the seed spread" when it is larger than
the two standard deviations added (the mean ± std intervals do not overlap): a conservative,
easily checked rule, not a significance test.

Columns besides the matrix's: ``in-language+M`` scores a task module of method M trained on the
target language's own data (over its own language module): the supervised ceiling.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from xlpeft.errors import XlpeftError
from xlpeft.evaluation import EvalSet
from xlpeft.io import LoadedModule
from xlpeft.lineage import baseline_stack
from xlpeft.matrix import BASELINE, Matrix, Scorer, baseline_langs, heatmap, matrix_row
from xlpeft.metrics import METRICS
from xlpeft.packs import TaskPack

IN_LANGUAGE = "in-language"


@dataclass
class SeedGroup:
    """The modules one seed trained: language modules by (lang, method), task modules by (source lang, method)."""

    seed: int
    lang_mods: dict[tuple[str, str], LoadedModule] = field(default_factory=dict)
    task_mods: dict[tuple[str, str], LoadedModule] = field(default_factory=dict)


def group_by_seed(modules: list[LoadedModule], task: str) -> dict[int, SeedGroup]:
    """Language modules and ``task`` task modules, by the seed in their manifests (other modules are ignored).

    Raises:
        XlpeftError: a module records no seed, or two modules of one seed share language (and task) and method,
            so it is ambiguous which one a cell scores.
    """
    groups: dict[int, SeedGroup] = {}
    for mod in modules:
        man = mod.manifest
        if man.kind not in ("language", "task") or (man.kind == "task" and man.task != task):
            continue
        seed = man.training.get("seed")
        if not isinstance(seed, int):
            raise XlpeftError(f"{mod.path}: its manifest records no seed (training.seed); retrain it with xlpeft >= 0.2 "
                              "or move it out of the --modules-dir folder")
        group = groups.setdefault(seed, SeedGroup(seed))
        table = group.lang_mods if man.kind == "language" else group.task_mods
        key = (man.lang or "?", man.method)
        if key in table:
            raise XlpeftError(f"two {man.kind} modules for {key[0]} with method {key[1]} and seed {seed}: {table[key].path} "
                              f"and {mod.path}; keep one per seed under --modules-dir")
        table[key] = mod
    return dict(sorted(groups.items()))


def seed_matrix(scorer: Scorer, pack: TaskPack, group: SeedGroup, source: str, rows: dict[str, EvalSet]) -> Matrix:
    """One seed's matrix: every target module under every ``source`` task module, the baselines, the ceilings.

    Args:
        scorer: the base's scorer, shared by every seed (:class:`~xlpeft.matrix.Scorer`).
        rows: target language -> its evaluation examples, prepared once (:meth:`Scorer.prepare`).
    """
    base = scorer.base
    key = METRICS[pack.metric]
    task_mods = {m: mod for (lang, m), mod in group.task_mods.items() if lang == source}
    if not task_mods:
        found = ", ".join(sorted(f"{lang}/{m}" for lang, m in group.task_mods)) or "none"
        raise XlpeftError(f"seed {group.seed}: no {pack.task} task module trained on {source} (task modules found: "
                          f"{found}); pass --source or train one with `xlpeft train-task --lang {source} --seed "
                          f"{group.seed}`")
    references = {m: baseline_stack(mod, base.fingerprint) for m, mod in task_mods.items()}
    matrix = Matrix(key, {}, {}, baseline_langs(references))
    for lang, data in rows.items():
        lang_mods = {m: mod for (code, m), mod in group.lang_mods.items() if code == lang}
        if not lang_mods:
            matrix.skipped[lang] = f"no language module for {lang} with seed {group.seed}"
            continue
        row = matrix_row(scorer, data, task_mods, lang_mods, references)
        for (code, m), mod in group.task_mods.items():
            if code == lang:  # trained on the target's own data: the supervised ceiling
                stack = baseline_stack(mod, base.fingerprint)
                row[f"{IN_LANGUAGE}+{m}"] = scorer.score(stack, data)
        matrix.rows[lang] = row
    return matrix


def _column_order(col: str) -> tuple[int, str]:
    return (2 if col.startswith(IN_LANGUAGE) else 1 if col.startswith(BASELINE) else 0), col


@dataclass
class SeedTable:
    """Per-seed scores of every cell (``values[lang][column] = [score of each seed]``) and their summary."""

    metric: str
    seeds: list[int]
    values: dict[str, dict[str, list[float]]]
    skipped: dict[str, str]
    baseline_langs: dict[str, str]

    @classmethod
    def of(cls, matrices: dict[int, Matrix]) -> SeedTable:
        """Collect the per-seed matrices (a language skipped for one seed is reported with its reason)."""
        first = next(iter(matrices.values()))
        values: dict[str, dict[str, list[float]]] = {}
        skipped: dict[str, str] = {}
        langs = list(dict.fromkeys(lang for m in matrices.values() for lang in [*m.rows, *m.skipped]))
        for lang in langs:
            for seed, m in matrices.items():
                if lang in m.skipped:
                    skipped[lang] = f"seed {seed}: {m.skipped[lang]}"
                for col, v in m.rows.get(lang, {}).items():
                    values.setdefault(lang, {}).setdefault(col, []).append(v)
        baseline_langs = {tm: src for m in matrices.values() for tm, src in m.baseline_langs.items()}
        return cls(first.metric, list(matrices), values, skipped, baseline_langs)

    def columns(self) -> list[str]:
        """Language x task method cells, then ``baseline+``, then ``in-language+`` columns."""
        return sorted({c for row in self.values.values() for c in row}, key=_column_order)

    def stats(self, lang: str, col: str) -> tuple[float, float, int]:
        """(mean, sample std (0 for one seed), number of seeds) of one cell."""
        xs = self.values[lang][col]
        return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)

    def versus_baseline(self, lang: str, col: str) -> tuple[float, bool] | None:
        """(mean difference from the same task method's baseline, whether it exceeds the two seed spreads added).

        None for a baseline column, or when the row has no baseline of that task method.
        """
        if col.startswith(BASELINE):
            return None
        ref = f"{BASELINE}+{col.split('+', 1)[1]}"
        if ref not in self.values.get(lang, {}):
            return None
        (m, s, n), (mb, sb, nb) = self.stats(lang, col), self.stats(lang, ref)
        return m - mb, min(n, nb) > 1 and abs(m - mb) > s + sb  # one seed has no spread to exceed

    def cell(self, lang: str, col: str) -> str:
        if col not in self.values.get(lang, {}):
            return "–"
        m, s, n = self.stats(lang, col)
        diff = self.versus_baseline(lang, col)
        mark = "" if diff is None else f" ({diff[0]:+.3f}{'*' if diff[1] else ''})"
        return f"{m:.3f}{f' ± {s:.3f}' if n > 1 else ''}{mark}"  # one seed has no spread to show

    def legend(self) -> list[str]:
        per_col = {c: max(len(row[c]) for row in self.values.values() if c in row) for c in self.columns()}
        most = max(per_col.values(), default=0)
        fewer = ", ".join(f"{c}: {n}" for c, n in per_col.items() if n < most)
        lines = [f"{self.metric}: mean ± sample std over seeds {', '.join(map(str, self.seeds))} ({most} per cell"
                 f"{'; ' + fewer if fewer else ''}); (±d) is the difference from the baseline of the same task method; "
                 "* marks a difference larger than the two cells' standard deviations added (never with one seed)"]
        lines += [f"{BASELINE}+{tm}: the {tm} task module over its own source-language module ({src}), "
                  "no target-language module" for tm, src in self.baseline_langs.items()]
        if any(c.startswith(IN_LANGUAGE) for c in self.columns()):
            lines.append(f"{IN_LANGUAGE}+M: a task module trained on the target language's own training split, "
                         "over its own language module (the supervised ceiling)")
        return lines + [f"{lang}: skipped ({why})" for lang, why in self.skipped.items()]

    def format(self) -> str:
        cols = self.columns()
        w = max([len(c) + 2 for c in cols] + [26])
        lines = [f"{'':<6}" + "".join(f"{c:>{w}}" for c in cols)]
        lines += [f"{lang:<6}" + "".join(f"{self.cell(lang, c):>{w}}" for c in cols) for lang in self.values]
        return "\n".join(lines + self.legend())

    def markdown(self) -> str:
        cols = self.columns()
        lines = [f"| {self.metric} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {lang} | " + " | ".join(self.cell(lang, c) for c in cols) + " |" for lang in self.values]
        return "\n".join(lines + [""] + [f"- {line}" for line in self.legend()])

    def means(self) -> Matrix:
        """The mean of every cell as a :class:`~xlpeft.matrix.Matrix` (for the heat-map)."""
        rows = {lang: {c: self.stats(lang, c)[0] for c in row} for lang, row in self.values.items()}
        return Matrix(self.metric, rows, dict(self.skipped), dict(self.baseline_langs))

    def save(self, directory: Path, title: str) -> None:
        """``seeds.json`` (every seed's score), ``seeds.txt``, ``seeds.md`` and the heat-map of means ``seeds.png``."""
        summary = {"metric": self.metric, "seeds": self.seeds, "values": self.values, "skipped": self.skipped,
                   "baseline_langs": self.baseline_langs,
                   "summary": {lang: {c: dict(zip(("mean", "std", "n"), self.stats(lang, c), strict=True))
                                      | _versus(self.versus_baseline(lang, c)) for c in row}
                               for lang, row in self.values.items()}}
        (directory / "seeds.json").write_text(json.dumps(summary, indent=2))
        (directory / "seeds.txt").write_text(self.format() + "\n")
        (directory / "seeds.md").write_text(self.markdown() + "\n")
        if self.values:
            heatmap(self.means(), directory / "seeds.png", title, self.columns())


def _versus(diff: tuple[float, bool] | None) -> dict:
    return {} if diff is None else {"minus_baseline": diff[0], "exceeds_spread": diff[1]}

