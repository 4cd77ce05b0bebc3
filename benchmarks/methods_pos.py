"""Zero-shot POS of every language-method x task-method pair over seeds, from `xlpeft evaluate` reports (issue 18).

    .venv/bin/python benchmarks/methods_pos.py benchmarks/results/pos-methods-e5-small-bible-s1.json \\
        modules/pm/e5-small-bible/report-methods/seeds.json --out benchmarks/results/pos-methods-e5-small-bible-s123

``pipelines/pos-methods.yaml`` ends with ``xlpeft evaluate --report``, whose ``seeds.json`` holds every
seed's score of every cell. Seeds run at different times (here seed 1, then seeds 2 and 3 into another
modules folder) give several reports; this joins them without scoring anything again (a seed's cell
given twice is refused), writes the joined ``.json`` and ``.md`` (per target, mean ± sample std, the
difference from the same task method's baseline) and prints the table of the README: per language
method (rows) and task method (columns), the mean over the targets, as mean ± sample std over seeds
of each seed's mean over targets.

When some methods' modules were retrained (e.g. at new defaults) and only the cells that involve them were
scored again, ``--rescored REPORT... --methods prefix,compacter`` puts those cells in place of the old ones;
re-scored cells over unchanged modules (the other methods' baselines) are compared with the old scores,
not used, and the comparison is printed and kept in the ``.json``::

    .venv/bin/python benchmarks/methods_pos.py OLD_S1.json OLD_S2.json OLD_S3.json \\
        --rescored A_S1.json B_S1.json A_S2.json B_S2.json A_S3.json B_S3.json --methods prefix,compacter --out OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xlpeft.matrix import BASELINE  # noqa: E402
from xlpeft.seeds import IN_LANGUAGE, SeedTable  # noqa: E402

Cells = dict[int, dict[str, dict[str, float]]]  # seed -> target -> column -> score


def read(paths: list[Path]) -> tuple[str, Cells, dict[str, str], dict[str, str]]:
    """(metric, every seed's cells, skipped targets, baseline languages) of several reports; a cell given twice is refused."""
    reports = [json.loads(p.read_text()) for p in paths]
    metric = {r["metric"] for r in reports}
    if len(metric) != 1:
        raise SystemExit(f"the reports score different metrics: {sorted(metric)}")
    cells: Cells = {}
    for path, r in zip(paths, reports, strict=True):
        for lang, row in r["values"].items():
            for col, xs in row.items():
                if len(xs) != len(r["seeds"]):
                    raise SystemExit(f"{path}: {lang} {col}: {len(xs)} scores for seeds {r['seeds']}; a cell is missing a seed")
                for seed, x in zip(r["seeds"], xs, strict=True):
                    row_of = cells.setdefault(seed, {}).setdefault(lang, {})
                    if col in row_of:
                        raise SystemExit(f"{path}: seed {seed} {lang} {col} is in an earlier report too; give each "
                                         "seed's cell once")
                    row_of[col] = x
    skipped = {k: v for r in reports for k, v in r["skipped"].items()}
    baselines = {k: v for r in reports for k, v in r["baseline_langs"].items()}
    return metric.pop(), cells, skipped, baselines


def involves(col: str, methods: set[str]) -> bool:
    """Whether a ``lang+task`` column has a language or task module of one of ``methods``."""
    return bool(set(col.split("+", 1)) & methods)


def rescore(cells: Cells, new: Cells, methods: set[str]) -> list[str]:
    """Replace, in ``cells``, every cell that involves ``methods`` with its re-scored value from ``new``.

    A re-scored cell that does not involve ``methods`` (e.g. a baseline over an unchanged module) is not
    used: it is compared with the old value, and the comparison is returned as one line, so a reader can see
    whether the unchanged modules reproduced. Every old cell that involves ``methods`` must be re-scored.
    """
    if set(new) != set(cells):
        raise SystemExit(f"the re-scored reports hold seeds {sorted(new)}, the others {sorted(cells)}; give the same seeds")
    same, moved = 0, []
    for seed, rows in cells.items():
        for lang, row in rows.items():
            for col in row:
                if involves(col, methods) and col not in new[seed].get(lang, {}):
                    raise SystemExit(f"seed {seed} {lang} {col} involves {sorted(methods)} but no re-scored report has it")
            for col, x in new[seed].get(lang, {}).items():
                if involves(col, methods):
                    row[col] = x
                elif col in row:
                    same += row[col] == x
                    if row[col] != x:
                        moved.append(f"seed {seed} {lang} {col} {row[col]:.4f} -> {x:.4f}")
    return [f"{same} re-scored cells over unchanged modules equal their old score"
            + (f"; {len(moved)} differ: " + "; ".join(moved) if moved else "")]


def table_of(metric: str, cells: Cells, skipped: dict[str, str], baselines: dict[str, str]) -> SeedTable:
    """The :class:`SeedTable` of every seed's cells, seeds in order."""
    order = sorted(cells)
    langs = list(dict.fromkeys(lang for s in order for lang in cells[s]))
    cols = {(lang, col) for s in cells.values() for lang, row in s.items() for col in row}
    values = {lang: {col: [cells[s][lang][col] for s in order if col in cells[s].get(lang, {})]
                     for col in sorted(c for la, c in cols if la == lang)} for lang in langs}
    return SeedTable(metric, order, values, skipped, baselines)


def join(paths: list[Path]) -> SeedTable:
    """One :class:`SeedTable` over every report's seeds, in seed order."""
    return table_of(*read(paths))


FIRST = ("adapter", "sft", "lora", "ia3", "prefix", "compacter", "parallel", "mam")  # the README's order


def _ordered(names) -> list[str]:
    unique = list(dict.fromkeys(names))
    return sorted(unique, key=lambda m: (FIRST.index(m) if m in FIRST else len(FIRST), m))


def pair_table(table: SeedTable) -> str:
    """Language method x task method: mean over targets per seed, then mean ± sample std over seeds."""
    langs = list(table.values)
    cols = [c for c in table.columns() if not c.startswith(IN_LANGUAGE)]
    lang_methods = _ordered(c.split("+", 1)[0] for c in cols if not c.startswith(BASELINE))
    task_methods = _ordered(c.split("+", 1)[1] for c in cols)

    def summary(col: str) -> str:
        rows = [table.values[lang].get(col) for lang in langs]
        if any(r is None or len(r) != len(table.seeds) for r in rows):
            return "–"
        per_seed = [statistics.fmean(r[i] for r in rows) for i in range(len(table.seeds))]
        sd = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        return f"{statistics.fmean(per_seed):.3f} ± {sd:.3f}"

    out = ["| language module ↓ / task module → | " + " | ".join(task_methods) + " |",
           "|---" + "|---:" * len(task_methods) + "|"]
    for lm in [*lang_methods, BASELINE]:
        label = "baseline: task module over its en module" if lm == BASELINE else lm
        out.append(f"| {label} | " + " | ".join(summary(f"{lm}+{tm}") for tm in task_methods) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path, help="seeds.json of `xlpeft evaluate --report` (one per run)")
    ap.add_argument("--rescored", nargs="+", type=Path, default=[],
                    help="seeds.json of evaluations that re-scored the cells of --methods (modules retrained)")
    ap.add_argument("--methods", default="", help="with --rescored: comma-separated methods whose cells they replace")
    ap.add_argument("--out", type=Path, help="write OUT.json (every seed's score) and OUT.md (per target)")
    args = ap.parse_args()
    metric, cells, skipped, baselines = read(args.reports)
    notes: list[str] = []
    if args.rescored:
        methods = {m for m in args.methods.split(",") if m}
        if not methods:
            raise SystemExit("--rescored needs --methods: the methods whose modules were retrained, e.g. prefix,compacter")
        new_metric, new, new_skipped, new_baselines = read(args.rescored)
        if new_metric != metric:
            raise SystemExit(f"the re-scored reports score {new_metric}, the others {metric}")
        notes = rescore(cells, new, methods)
        skipped, baselines = {**skipped, **new_skipped}, {**baselines, **new_baselines}
    table = table_of(metric, cells, skipped, baselines)
    sources = [*map(str, args.reports), *(f"{p} (re-scored {args.methods})" for p in args.rescored)]
    print(f"seeds {', '.join(map(str, table.seeds))}; targets {', '.join(table.values)}; from {', '.join(sources)}")
    for line in notes:
        print(line)
    print(pair_table(table))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"metric": table.metric, "seeds": table.seeds, "values": table.values, "skipped": table.skipped,
                   "baseline_langs": table.baseline_langs, "from": sources, "notes": notes}
        args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table.markdown() + "\n")
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
