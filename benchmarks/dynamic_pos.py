"""Dynamic sparse (SpIEL) language deltas against LT-SFT's on real POS data: is transfer as good without the dense phase?

    .venv/bin/python benchmarks/dynamic_pos.py --modules-dir modules/pos-universal/e5-small-bible
    .venv/bin/python benchmarks/dynamic_pos.py --modules-dir DIR --seeds 1,2,3 --readme benchmarks/README.md

Issue 19's quality goal on the POS benchmark: zero-shot accuracy of the dynamic delta within one seed
standard deviation of LT-SFT's, or better. For each seed and target (id, tr, km) it scores, on the target's
real test set, the English task delta of ``pipelines/pos-universal.yaml`` (trained over the English LT-SFT
delta) composed over:

* ``en``: the English LT-SFT language delta (no target module), the floor;
* ``LT-SFT``: the target's LT-SFT delta (``pos-universal.yaml``: 30 dense + 30 sparse steps);
* ``dynamic``: the target's dynamic delta (``pipelines/pos-dynamic.yaml``: 60 sparse steps, same K, text,
  learning rate and seed).

Prints the machine, the wall time, and mean ± sample std over seeds with the difference from ``LT-SFT``.
Nothing here is tuned: every setting is the pipelines', fixed before any score was seen.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pos_scoring import accuracy_over, cell, score_cli  # noqa: E402  (the POS scoring benchmarks' shared command line)

SYSTEMS = ("en", "LT-SFT", "dynamic")


def score_target(base, pack, target: str, seed_dir: Path, limit: int | None) -> dict:
    """Every system's accuracy for ``target`` with one seed's modules (see the module docstring)."""
    accuracy = accuracy_over(base, pack, target, seed_dir, limit, "task-pos-en-sft")
    return {"en": accuracy("lang-en-sft"), "LT-SFT": accuracy(f"lang-{target}-sft"),
            "dynamic": accuracy(f"lang-{target}-sft-dynamic")}


def table(results: dict[int, dict[str, dict]], targets: list[str]) -> str:
    """Markdown: a row per target, a column per system, mean ± std over seeds, the difference from ``LT-SFT``.

    ``*`` marks a difference larger than the two cells' standard deviations added, as the other POS tables
    do; ``within 1 sd`` answers the issue's goal: |dynamic - LT-SFT| <= LT-SFT's seed standard deviation, or better.
    """
    import statistics

    lines = ["| accuracy | " + " | ".join(SYSTEMS) + " | goal: within 1 sd of LT-SFT or better |",
             "|---" * (len(SYSTEMS) + 2) + "|"]
    for t in targets:
        ref = [results[seed][t]["LT-SFT"] for seed in results]
        dyn = [results[seed][t]["dynamic"] for seed in results]
        cells = [cell([results[seed][t][s] for seed in results], ref, s == "LT-SFT") for s in SYSTEMS]
        sd = statistics.stdev(ref) if len(ref) > 1 else 0.0
        gap = statistics.mean(dyn) - statistics.mean(ref)
        verdict = "—" if len(ref) < 2 else ("met" if gap >= -sd else f"missed ({gap:+.3f} vs sd {sd:.3f})")
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return score_cli("dynamic_pos", __doc__, score_target, table, "dynamic",
                     "<out>/<base> of pos-universal.yaml + pos-dynamic.yaml", argv)


if __name__ == "__main__":
    raise SystemExit(main())
