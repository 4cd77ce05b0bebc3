"""AdapterFusion of other languages' adapters on real POS data, against its inputs and the target's own adapter.

    .venv/bin/python benchmarks/fusion_pos.py --modules-dir modules/pos-universal/e5-small-bible
    .venv/bin/python benchmarks/fusion_pos.py --modules-dir DIR --seeds 1 --readme benchmarks/README.md

Issue 22's question: for a target language, does a fusion of the other languages' adapters (fusion
layers trained by MLM on the target's text, `pipelines/pos-fusion.yaml`) serve the English POS task
adapter better than the English adapter it was trained over, and how does it compare with the
target's own adapter trained on the same text with the same budget? For each seed and target (id, tr,
km) it scores on the target's real test set, with xlpeft's own code paths, the English task adapter over:

* ``en``: the English language adapter (no target module at all), the baseline;
* ``best input``: the best single fused adapter (each of the three in turn; the oracle pick, on the test set);
* ``fusion``: the target's fusion module;
* ``own``: the target's own language adapter (MAD-X).

Prints the machine, the wall time, and mean ± sample std over seeds with the difference from ``en``;
``--readme`` writes the table into a marked section. Nothing here is tuned: every setting is the
pipeline's, fixed before any score was seen; ``best input`` is an oracle shown only to say whether
fusing beats picking, never used to choose anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pos_scoring import accuracy_over, inputs_table, other_inputs, score_cli  # noqa: E402  (the POS scoring benchmarks' shared command line)

SYSTEMS = ("en", "best input", "fusion", "own")


def score_target(base, pack, target: str, seed_dir: Path, limit: int | None) -> dict:
    """Every system's accuracy for ``target`` with one seed's modules (see the module docstring)."""
    accuracy = accuracy_over(base, pack, target, seed_dir, limit, "task-pos-en-adapter")
    return {**other_inputs(accuracy, target, "adapter"), "fusion": accuracy(f"lang-{target}-fusion"),
            "own": accuracy(f"lang-{target}-adapter")}


def table(results: dict[int, dict[str, dict]], targets: list[str]) -> str:
    """Markdown: a row per target, a column per system, mean ± std over seeds, the difference from ``en``."""
    return inputs_table(results, targets, SYSTEMS)


def main(argv: list[str] | None = None) -> int:
    return score_cli("fusion_pos", __doc__, score_target, table, "fusion", "<out>/<base> of pos-multisource.yaml + pos-fusion.yaml", argv)


if __name__ == "__main__":
    sys.exit(main())
