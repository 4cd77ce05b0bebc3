"""New tokens (whole words, or sub-word pieces) in the target's language adapter on real POS data: do they help?

    .venv/bin/python benchmarks/vocab_pos.py --modules-dir modules/pos-universal/e5-small-bible
    .venv/bin/python benchmarks/vocab_pos.py --modules-dir DIR --seeds 2,3 --readme benchmarks/README.md

Issue 22's vocabulary extension (``train-lang --set new_tokens=N``, :mod:`xlpeft.vocab`). For each seed and
target (id, tr, km) it scores, on the target's real test set, the English task adapter of
``pipelines/pos-multisource.yaml`` composed over:

* ``en``: the English language adapter (no target module), the floor;
* ``own``: the target's own language adapter (MAD-X zero-shot transfer);
* ``own + new tokens``: the same adapter trained with new tokens (``pipelines/pos-vocab.yaml``; the same
  text, steps and seed), scored with its extended tokenizer; ``new`` is how many words it added;
* ``own + new pieces``: the same with ``--set new_token_unit=piece`` (sub-word pieces of a model trained on the
  text: for scripts written without spaces), where ``pos-vocab.yaml``'s ``piece_langs`` trained it (else —).

Prints the machine, the wall time, and mean ± sample std over seeds with the difference from ``own``.
Nothing here is tuned: every setting is the pipelines', fixed before any score was seen.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pos_scoring import accuracy_over, cell, score_cli  # noqa: E402  (the POS scoring benchmarks' shared command line)

SYSTEMS = ("en", "own", "own + new tokens", "own + new pieces")


def score_target(base, pack, target: str, seed_dir: Path, limit: int | None) -> dict:
    """Every system's accuracy for ``target`` with one seed's modules (see the module docstring)."""
    from xlpeft import load_module
    from xlpeft.vocab import NewVocab

    accuracy = accuracy_over(base, pack, target, seed_dir, limit, "task-pos-en-adapter")  # with a module's new words

    def added(name: str) -> int:
        vocab = NewVocab.from_extra(load_module(seed_dir / name).manifest.extra)
        return len(vocab.tokens) if vocab else 0

    pieces = f"lang-{target}-adapter-pieces"
    has_pieces = (seed_dir / pieces).is_dir()
    return {"en": accuracy("lang-en-adapter"), "own": accuracy(f"lang-{target}-adapter"),
            "own + new tokens": accuracy(f"lang-{target}-adapter-vocab"), "new": added(f"lang-{target}-adapter-vocab"),
            "own + new pieces": accuracy(pieces) if has_pieces else None, "new pieces": added(pieces) if has_pieces else 0}


def table(results: dict[int, dict[str, dict]], targets: list[str]) -> str:
    """Markdown: a row per target, a column per system, mean ± std over seeds, the difference from ``own``.

    ``*`` marks a difference larger than the two cells' standard deviations added, as the other POS tables
    do (a conservative check, not a significance test; never claimed from fewer than two seeds).
    """
    lines = ["| accuracy | " + " | ".join(SYSTEMS) + " | new words | new pieces |", "|---" * (len(SYSTEMS) + 3) + "|"]
    for t in targets:
        own = [results[seed][t]["own"] for seed in results]
        cells = []
        for s in SYSTEMS:  # a system some seed lacks (no pieces trained, or an earlier --json): not shown
            vals = [results[seed][t].get(s) for seed in results]
            cells.append("—" if None in vals else cell(vals, own, s == "own"))
        added = [",".join(str(results[seed][t].get(key, 0)) for seed in results) for key in ("new", "new pieces")]
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {added[0]} | {added[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return score_cli("vocab_pos", __doc__, score_target, table, "vocab", "<out>/<base> of pos-multisource.yaml + pos-vocab.yaml", argv)


if __name__ == "__main__":
    raise SystemExit(main())
