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
    text = table(results, targets)
    print(text)
    print(f"scored in {seconds / 60:.1f} min wall ({len(seeds)} seed(s) x {len(targets)} target(s))")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    if args.readme:
        body = "\n".join([
            f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {host}.",
            f"`benchmarks/{name}.py --modules-dir {args.modules_dir} --seeds {args.seeds} --targets "
            f"{args.targets}{f' --limit {args.limit}' if args.limit else ''}`: {seconds / 60:.1f} min wall to score.",
            "", text, ""])
        write_section(args.readme, f"{section} base={args.base} seeds={args.seeds}", body)
    return 0


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
