"""Zero-shot POS of every language-method x task-method pair over seeds, from `xlpeft evaluate` reports (issue 18).

    .venv/bin/python benchmarks/methods_pos.py benchmarks/results/pos-methods-e5-small-bible-s1.json \\
        modules/pm/e5-small-bible/report-methods/seeds.json --out benchmarks/results/pos-methods-e5-small-bible-s123

``pipelines/pos-methods.yaml`` ends with ``xlpeft evaluate --report``, whose ``seeds.json`` holds every
seed's score of every cell. Seeds run at different times (here seed 1, then seeds 2 and 3 into another
modules folder) give several reports; this joins them without scoring anything again (a seed present
in two reports is refused), writes the joined ``.json`` and ``.md`` (per target, mean ± sample std, the
difference from the same task method's baseline) and prints the table of the README: per language
method (rows) and task method (columns), the mean over the targets, as mean ± sample std over seeds
of each seed's mean over targets.
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


def join(paths: list[Path]) -> SeedTable:
    """One :class:`SeedTable` over every report's seeds, in seed order."""
    reports = [json.loads(p.read_text()) for p in paths]
    seeds: list[int] = []
    for path, r in zip(paths, reports, strict=True):
        clash = sorted(set(seeds) & set(r["seeds"]))
        if clash:
            raise SystemExit(f"{path}: seed(s) {clash} are in an earlier report too; give each seed once")
        seeds += r["seeds"]
    metric = {r["metric"] for r in reports}
    if len(metric) != 1:
        raise SystemExit(f"the reports score different metrics: {sorted(metric)}")
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    for r in reports:
        for lang, row in r["values"].items():
            for col, xs in row.items():
                if len(xs) != len(r["seeds"]):
                    raise SystemExit(f"{lang} {col}: {len(xs)} scores for seeds {r['seeds']}; a cell is missing a seed")
                for seed, x in zip(r["seeds"], xs, strict=True):
                    per_seed.setdefault(seed, {}).setdefault(lang, {})[col] = x
    order = sorted(seeds)
    langs = list(dict.fromkeys(lang for r in reports for lang in r["values"]))
    cols = {(lang, col) for s in per_seed.values() for lang, row in s.items() for col in row}
    values = {lang: {col: [per_seed[s][lang][col] for s in order if col in per_seed[s].get(lang, {})]
                     for col in sorted(c for la, c in cols if la == lang)} for lang in langs}
    skipped = {k: v for r in reports for k, v in r["skipped"].items()}
    baselines = {k: v for r in reports for k, v in r["baseline_langs"].items()}
    return SeedTable(metric.pop(), order, values, skipped, baselines)


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
    ap.add_argument("--out", type=Path, help="write OUT.json (every seed's score) and OUT.md (per target)")
    args = ap.parse_args()
    table = join(args.reports)
    print(f"seeds {', '.join(map(str, table.seeds))}; targets {', '.join(table.values)}; from "
          f"{', '.join(map(str, args.reports))}")
    print(pair_table(table))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"metric": table.metric, "seeds": table.seeds, "values": table.values, "skipped": table.skipped,
                   "baseline_langs": table.baseline_langs, "from": [str(p) for p in args.reports]}
        args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table.markdown() + "\n")
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
