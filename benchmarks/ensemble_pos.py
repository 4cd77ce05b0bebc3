"""Languages treated as if they had no module, on real POS data: ensembles, EMEA, related-language fallback.

    .venv/bin/python benchmarks/ensemble_pos.py --modules-dir modules/pos-universal/e5-small-bible
    .venv/bin/python benchmarks/ensemble_pos.py --modules-dir DIR --seeds 1 --targets km --readme benchmarks/README.md

Issue 22's question: for a target language without a language module, what should stand in under
the English task adapter? For each seed and each target of `pipelines/pos-ensemble.yaml` (id, tr,
km; the modules `xlpeft run pipelines/pos-ensemble.yaml` trains, the adapter half of
pos-universal's) it scores on the target's real test set, with xlpeft's own code paths:

* ``english``: the task adapter over the English language adapter (the MAD-X baseline);
* each other language's adapter alone (en and the other targets);
* ``average``: the ensemble of all of them (``build_ensemble``, α uniform);
* ``emea``: the same ensemble with EMEA weights (1 step a batch, lr 10: the library's defaults,
  never tuned here);
* ``related``: what ``compose --fallback related`` picks (the closest languages by the packs'
  genus / family / script, ensembled when tied; "none" when nothing is related, i.e. the baseline);
* ``own``: the target's own language adapter, which the other rows pretend does not exist (the
  reference they try to approach).

Prints the machine, the wall time, and mean ± sample std over seeds; ``--readme`` writes the table into
a marked section. Nothing here is tuned: every setting is the library's default or the pipeline's.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pos_scoring import score_cli  # noqa: E402  (the POS scoring benchmarks' shared command line)

LANGS = ("en", "id", "tr", "km")


def score_target(base, pack, target: str, seed_dir: Path, limit: int | None) -> dict[str, float]:
    """Every system's accuracy for ``target`` with one seed's modules (see the module docstring)."""
    from xlpeft import compose, load_module
    from xlpeft.compose import ModuleRef
    from xlpeft.ensemble import EnsembleConfig, build_ensemble
    from xlpeft.errors import XlpeftError
    from xlpeft.evaluation import eval_examples, evaluate_model
    from xlpeft.related import closest

    examples, _ = eval_examples(pack, target, None)
    examples = examples[:limit] if limit else examples
    ref = {lang: ModuleRef.of(load_module(seed_dir / f"lang-{lang}-adapter")) for lang in LANGS}
    task = ModuleRef.of(load_module(seed_dir / "task-pos-en-adapter"))
    others = [lang for lang in LANGS if lang != target]

    def alone(lang: str) -> float:
        return evaluate_model(compose(base, [ref[lang].module, task.module]), pack, base.tokenizer, examples)["accuracy"]

    def ensemble(langs: list[str], steps: int) -> float:
        model = build_ensemble(base, [ref[m] for m in langs], task, EnsembleConfig(emea_steps=steps))
        return evaluate_model(model, pack, base.tokenizer, examples)["accuracy"]

    out = {"own": alone(target)}
    out |= {f"alone:{lang}": alone(lang) for lang in others}
    out["english"] = out["alone:en"]
    out["average"] = ensemble(others, 0)
    out["emea"] = ensemble(others, 1)
    try:
        chosen, _ = closest(target, others)
        picked = [r.lang for r in chosen]
        out["related"] = out[f"alone:{picked[0]}"] if len(picked) == 1 else ensemble(picked, 0)
        out["related_langs"] = ",".join(picked)  # type: ignore[assignment]
    except XlpeftError:  # nothing related: compose --fallback related refuses; the user keeps the baseline
        out["related"], out["related_langs"] = out["english"], "none"  # type: ignore[assignment]
    return out


def table(results: dict[int, dict[str, dict]], targets: list[str]) -> str:
    """Markdown: a row per target, a column per system, mean ± std over seeds, the difference from english.

    ``*`` marks a difference larger than the two cells' standard deviations added, as transfer_pos.py's
    table does (a conservative check, not a significance test; never claimed from one seed).
    """
    systems = ["english", "related", "average", "emea", "own"]
    lines = ["| accuracy | " + " | ".join(systems) + " | best single other (oracle) |",
             "|---" * (len(systems) + 2) + "|"]
    for t in targets:
        cells = []
        for s in systems:
            vals = [results[seed][t][s] for seed in results]
            mean, sd = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
            eng = [results[seed][t]["english"] for seed in results]
            base = statistics.mean(eng)
            spread = sd + (statistics.stdev(eng) if len(eng) > 1 else 0.0)
            star = "*" if len(vals) > 1 and abs(mean - base) > spread else ""  # beyond the two sds added
            diff = "" if s == "english" else f" ({mean - base:+.3f}{star})"
            cells.append(f"{mean:.3f} ± {sd:.3f}{diff}" if len(vals) > 1 else f"{mean:.3f}{diff}")  # one seed: no sd
        picked = {results[seed][t]["related_langs"] for seed in results}
        others = [k for k in results[next(iter(results))][t] if k.startswith("alone:")]
        best = max(others, key=lambda k: statistics.mean(results[seed][t][k] for seed in results))
        best_mean = statistics.mean(results[seed][t][best] for seed in results)
        lines.append(f"| {t} (related: {', '.join(sorted(picked))}) | " + " | ".join(cells)
                     + f" | {best.removeprefix('alone:')} {best_mean:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return score_cli("ensemble_pos", __doc__, score_target, table, "ensemble", "<out>/<base> of pos-ensemble.yaml (s<seed>/...)", argv)


if __name__ == "__main__":
    sys.exit(main())
