"""The command line the POS scoring benchmarks share: seeds x targets scored, a table, JSON and a README section.

``ensemble_pos.py``, ``multisource_pos.py`` and ``fusion_pos.py`` each give :func:`score_cli` their own
``score_target`` (one seed's modules -> every system's score for one target) and ``table``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from transfer_pos import machine, write_section


def score_cli(name: str, doc: str, score_target: Callable, table: Callable, section: str, modules_help: str,
              argv: list[str] | None = None) -> int:
    """Parse the shared options, score every seed and target, print the table; ``--json`` / ``--readme`` keep it."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--modules-dir", type=Path, required=True, help=modules_help)
    parser.add_argument("--base", default="e5-small-bible")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--targets", default="id,tr,km")
    parser.add_argument("--limit", type=int, help="score only the first N test sentences of each target")
    parser.add_argument("--json", type=Path, help="also write the per-seed scores here")
    parser.add_argument("--readme", type=Path, help="write the table into this Markdown file's marked section")
    parser.add_argument("--earlier", type=Path, action="append", default=[],
                        help="a --json file of seeds scored before (by this script, on the same targets) to put in the "
                             "table beside these; its seeds must not be among --seeds")
    args = parser.parse_args(argv)
    from xlpeft.models import load_base
    from xlpeft.packs import load_task_pack

    host = machine()
    print(f"{name}: {host}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    base, pack = load_base(args.base), load_task_pack("pos")
    seeds, targets = [int(s) for s in args.seeds.split(",")], args.targets.split(",")
    results: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        results[seed] = {}
        for t in targets:
            t0 = time.perf_counter()
            results[seed][t] = score_target(base, pack, t, args.modules_dir / f"s{seed}", args.limit)
            print(f"seed {seed} {t}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in results[seed][t].items())
                  + f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    scored = args.seeds
    for path in args.earlier:  # JSON keys are strings; the same targets, or the table would mix rows
        earlier = {int(seed): by_target for seed, by_target in json.loads(path.read_text(encoding="utf-8")).items()}
        clash = sorted(set(earlier) & set(results))
        missing = sorted({t for by_target in earlier.values() for t in targets if t not in by_target})
        if clash or missing:
            raise SystemExit(f"--earlier {path}: seed(s) {clash} are also scored now, target(s) {missing} are not in it; "
                             "expected other seeds over the same --targets")
        results.update(earlier)
    results = dict(sorted(results.items()))
    seeds_label = ",".join(str(s) for s in results)
    text = table(results, targets)
    print(text)
    print(f"scored in {seconds / 60:.1f} min wall ({len(seeds)} seed(s) x {len(targets)} target(s))")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    if args.readme:
        body = "\n".join([
            f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {host}.",
            f"`benchmarks/{name}.py --modules-dir {args.modules_dir} --seeds {args.seeds} --targets "
            f"{args.targets}{f' --limit {args.limit}' if args.limit else ''}"
            + "".join(f" --earlier {path}" for path in args.earlier)
            + f"`: {seconds / 60:.1f} min wall to score seed(s) {scored}"
            + (f" (seed(s) {','.join(str(s) for s in results if str(s) not in scored.split(','))} read from "
               f"{', '.join(str(p) for p in args.earlier)}, scored the same way earlier)." if args.earlier else "."),
            "", text, ""])
        write_section(args.readme, f"{section} base={args.base} seeds={seeds_label}", body)
    return 0


LANGS = ("en", "id", "tr", "km")
"""The languages of the POS benchmark's modules: the source and the three targets."""


def accuracy_over(base, pack, target: str, seed_dir: Path, limit: int | None, task_dir: str) -> Callable[[str], float]:
    """``accuracy(lang_dir)``: the task module ``task_dir`` over that language module on ``target``'s real test set.

    The examples are read once; each composition is scored with its own tokenizer (a module's new words).
    """
    from xlpeft import compose, load_module
    from xlpeft.evaluation import eval_examples, evaluate_model

    examples, _ = eval_examples(pack, target, None)
    examples = examples[:limit] if limit else examples
    task = load_module(seed_dir / task_dir)

    def accuracy(lang_dir: str) -> float:
        model = compose(base, [load_module(seed_dir / lang_dir), task])
        return evaluate_model(model, pack, model.xlpeft_tokenizer, examples)["accuracy"]

    return accuracy


def other_inputs(accuracy: Callable[[str], float], target: str, method: str) -> dict:
    """The English module's score and the best of the other languages' modules (the oracle pick, on the test set)."""
    inputs = {lang: accuracy(f"lang-{lang}-{method}") for lang in LANGS if lang != target}
    best = max(inputs, key=inputs.get)
    return {"en": inputs["en"], "best input": inputs[best], "best_input_lang": best}


def cell(vals: list[float], ref: list[float], is_ref: bool) -> str:
    """``mean ± sd (difference from the reference column)`` over seeds; one seed: no sd.

    ``*`` marks a difference larger than the two cells' standard deviations added (a conservative check, not a
    significance test; never claimed from one seed).
    """
    import statistics

    mean, sd = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
    ref_mean, ref_sd = statistics.mean(ref), statistics.stdev(ref) if len(ref) > 1 else 0.0
    star = "*" if len(vals) > 1 and abs(mean - ref_mean) > sd + ref_sd else ""
    diff = "" if is_ref else f" ({mean - ref_mean:+.3f}{star})"
    return f"{mean:.3f} ± {sd:.3f}{diff}" if len(vals) > 1 else f"{mean:.3f}{diff}"


def inputs_table(results: dict[int, dict[str, dict]], targets: list[str], systems: tuple[str, ...]) -> str:
    """Markdown for a combination of modules against its inputs: a row per target, a column per system.

    Mean ± std over seeds and the difference from ``en``; the ``best input`` column names the input each
    seed's oracle picked. ``*`` marks a difference larger than the two cells' standard deviations added, as the
    other POS tables do (a conservative check, not a significance test; never claimed from one seed).
    """
    lines = ["| accuracy | " + " | ".join(systems) + " |", "|---" * (len(systems) + 1) + "|"]
    for t in targets:
        eng = [results[seed][t]["en"] for seed in results]
        cells = []
        for s in systems:
            picked = "" if s != "best input" else " [" + ",".join(results[seed][t]["best_input_lang"] for seed in results) + "]"
            cells.append(cell([results[seed][t][s] for seed in results], eng, s == "en") + picked)
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
