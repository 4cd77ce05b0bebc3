"""Multi-source task training on real POS data: English-only vs English plus other source languages.

    .venv/bin/python benchmarks/multisource_pos.py --modules-dir modules/pos-universal/e5-small-bible
    .venv/bin/python benchmarks/multisource_pos.py --modules-dir DIR --seeds 1 --readme benchmarks/README.md

Issue 22's question: does a task adapter trained on several source languages at once (each batch from
one source, with that source's language adapter under it; Ansell et al. 2022's multi-source recipe)
transfer better than the English-only one? For each seed and each target (id, tr, km) it scores, on the
target's real test set, the task adapters of `pipelines/pos-multisource.yaml` over the target's own
language adapter (MAD-X zero-shot transfer), with xlpeft's own code paths:

* ``en``: the English-only task adapter (Brown), the baseline;
* ``en+tr``, ``en+id``, ``en+tr+id``: the multi-source task adapters, same steps and batch size;
  a cell whose target is one of its sources is not zero-shot and is left out ("–").

Prints the machine, the wall time, and mean ± sample std over seeds with the difference from ``en``;
``--readme`` writes the table into a marked section. Nothing here is tuned: every setting is the
pipeline's, fixed before any score was seen.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pos_scoring import cell, score_cli  # noqa: E402  (the POS scoring benchmarks' shared command line)

SYSTEMS = ("en", "en+tr", "en+id", "en+tr+id")


def score_target(base, pack, target: str, seed_dir: Path, limit: int | None) -> dict[str, float]:
    """Every system's accuracy for ``target`` with one seed's modules (see the module docstring)."""
    from xlpeft import compose, load_module
    from xlpeft.evaluation import eval_examples, evaluate_model

    examples, _ = eval_examples(pack, target, None)
    examples = examples[:limit] if limit else examples
    lang = load_module(seed_dir / f"lang-{target}-adapter")
    out = {}
    for system in SYSTEMS:
        if target in system.split("+"):
            continue  # trained on the target's own labels: not zero-shot
        task = load_module(seed_dir / f"task-pos-{system}-adapter")
        model = compose(base, [lang, task])
        out[system] = evaluate_model(model, pack, base.tokenizer, examples)["accuracy"]
    return out


def table(results: dict[int, dict[str, dict]], targets: list[str]) -> str:
    """Markdown: a row per target, a column per system, mean ± std over seeds, the difference from ``en``.

    ``*`` marks a difference larger than the two cells' standard deviations added, as the other POS tables
    do (a conservative check, not a significance test; never claimed from one seed).
    """
    lines = ["| accuracy | " + " | ".join(SYSTEMS) + " |", "|---" * (len(SYSTEMS) + 1) + "|"]
    for t in targets:
        eng = [results[seed][t]["en"] for seed in results]
        cells = [cell([results[seed][t][s] for seed in results], eng, s == "en")
                 if s in results[next(iter(results))][t] else "–" for s in SYSTEMS]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return score_cli("multisource_pos", __doc__, score_target, table, "multisource", "<out>/<base> of pos-multisource.yaml", argv)


if __name__ == "__main__":
    sys.exit(main())
