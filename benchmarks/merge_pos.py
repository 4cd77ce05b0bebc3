"""Merged language modules of other languages on real POS data, against their inputs and the target's own module.

    .venv/bin/python benchmarks/merge_pos.py --modules-dir modules/pos-universal/e5-small-bible
    .venv/bin/python benchmarks/merge_pos.py --modules-dir DIR --seeds 2 --readme benchmarks/README.md

Issue 22's question for merging: for a target, does a merge of the other languages' LoRA language
modules (``xlpeft merge``, `pipelines/pos-merge.yaml`: linear and TIES) serve the English LoRA POS task
module better than the English module it was trained over, or better than the best single input? For
each seed and target (id, tr, km) it scores on the target's real test set the English LoRA task module over:

* ``en``: the English LoRA language module (no target module at all), the baseline;
* ``best input``: the best single merged input (each of the three in turn; the oracle pick, on the test set);
* ``linear``, ``ties``: the merges of the three;
* ``own``: the target's own LoRA language module, trained on its text.

Prints the machine, the wall time, and mean ± sample std over seeds with the difference from ``en``.
Nothing here is tuned: every setting is the pipeline's default, fixed before any score was seen; ``best
input`` is an oracle shown only to say whether merging beats picking, never used to choose anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pos_scoring import accuracy_over, inputs_table, other_inputs, score_cli  # noqa: E402  (the POS scoring benchmarks' shared command line)

SYSTEMS = ("en", "best input", "linear", "ties", "own")


def score_target(base, pack, target: str, seed_dir: Path, limit: int | None) -> dict:
    """Every system's accuracy for ``target`` with one seed's modules (see the module docstring)."""
    accuracy = accuracy_over(base, pack, target, seed_dir, limit, "task-pos-en-lora")
    return {**other_inputs(accuracy, target, "lora"), "linear": accuracy(f"lang-{target}-merge-linear"),
            "ties": accuracy(f"lang-{target}-merge-ties"), "own": accuracy(f"lang-{target}-lora")}


def table(results: dict[int, dict[str, dict]], targets: list[str]) -> str:
    """Markdown: a row per target, a column per system, mean ± std over seeds, the difference from ``en``."""
    return inputs_table(results, targets, SYSTEMS)


def main(argv: list[str] | None = None) -> int:
    return score_cli("merge_pos", __doc__, score_target, table, "merge", "<out>/<base> of pos-merge.yaml", argv)


if __name__ == "__main__":
    raise SystemExit(main())
