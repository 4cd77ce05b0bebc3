"""Evaluation-matrix throughput: the in-place path of ``xlpeft evaluate`` against the per-cell path it replaced (issue 20).

    .venv/bin/python benchmarks/eval_matrix.py --threads 1         # 6 languages x 4 modules, tiny BERT, 3 repeats
    .venv/bin/python benchmarks/eval_matrix.py --threads 1 --words 3-10 --sentences 512 --repeats 5

What is measured: the evaluation of one transfer matrix, everything ``evaluate_matrix`` does once the
modules are resolved and each language's examples are read: 6 target languages x 4 compositions
(language adapter / sft under task adapter / lora) plus the 2 baseline columns the command also
scores (each task module over its source language's module), i.e. 36 scored cells.

* **per-cell (today's, before issue 20)**: :func:`per_cell_row` below, a faithful copy of
  ``matrix_row`` and ``predict`` as they were at commit db6ecf6: per cell ``compose(base, [lang, task])`` builds a fresh
  Hugging Face task model from its config, copies the base encoder's weights in and applies the
  modules; ``evaluate_model`` encodes the language's examples again, sorts them by length, pads
  each batch of 32 and reads the predictions tensor element by element.
* **in place (now)**: ``xlpeft.matrix.matrix_row`` with one ``Scorer``: one model per task head for the
  whole matrix, per cell only the modules that differ from the previous cell's removed and applied
  in place, each language encoded and padded once.
* **the forward passes alone**: the in-place path's model calls, timed by themselves: work both
  paths share, so per-cell / forward-only is the most any removal of per-cell overhead can give.

Both run in this process on the same base, modules and examples, in turns (per-cell, in place,
per-cell, ...) for ``--repeats`` rounds; each path's figure is the median of its rounds, in
sentences scored per second (sentences x cells / seconds), by wall clock and by this process's CPU
time (with ``--threads 1`` the CPU figure is what other processes on a shared machine disturb least).
Every round checks the two matrices are equal. The base and the sentences are the tests' (tiny BERT
with a 200-piece tokenizer trained on Swahili and English lines; NER sentences of ``--words`` words);
modules are trained a few steps on random ids (their values do not change the cost).
Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.recipes.test_evaluate_matrix import train_module  # noqa: E402
from xlpeft.compose import compose  # noqa: E402
from xlpeft.data.tasks import NO_SUBWORD, TokenExample, collate  # noqa: E402
from xlpeft.evaluation import default_label, encode, score  # noqa: E402
from xlpeft.matrix import BASELINE, Scorer, matrix_row  # noqa: E402
from xlpeft.metrics import METRICS  # noqa: E402
from xlpeft.models import build_tiny_base, fit_seq_len, load_base  # noqa: E402
from xlpeft.packs import load_task_pack  # noqa: E402

LANGS = ("sw", "yo", "ha", "ig", "am", "wo")
SOURCE = "en"
LANG_METHODS = ("adapter", "sft")
TASK_METHODS = ("adapter", "lora")
# the tests' tiny base and NER sentences (tests/conftest.py): a tokenizer trained on Swahili and English lines
SW_WORDS = ("watu wote wamezaliwa huru hadhi na haki zao ni sawa wana akili na dhamiri hivyo yapasa watendeane "
            "kindugu kila mtu anastahili haki zote uhuru bila ubaguzi wa aina yoyote").split()
EN_WORDS = ("all human beings are born free and equal in dignity and rights they are endowed with reason and "
            "conscience and should act towards one another in a spirit of brotherhood").split()
ENTITIES = {"B-PER": ["Amina", "Juma", "Obama", "Kenyatta", "Mary", "John"],
            "B-ORG": ["UNESCO", "Safaricom", "Google", "Arsenal"], "B-LOC": ["Nairobi", "Dodoma", "London", "Lagos"]}


# ---- the baseline: today's per-cell path (matrix_row / evaluate_model / predict at db6ecf6, before issue 20), copied
@torch.no_grad()
def per_cell_predict(logits_fn, pack, tokenizer, examples, device="cpu", batch_size=32, max_len=128) -> list[Any]:
    """BASELINE: ``xlpeft.evaluation.predict`` before issue 20 (encode per call, pad per batch, index per element)."""
    enc = encode(pack, tokenizer, examples, max_len)
    fallback = default_label(pack)
    out: list[Any] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(enc.input_ids[i]))
    for start in range(0, len(examples), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(enc, idx, tokenizer.pad_token_id).items() if k != "labels"}
        best = logits_fn(batch).argmax(-1).cpu()  # (B, T) or (B,)
        for row, i in enumerate(idx):
            if pack.head == "token_classification":
                out[i] = [fallback if pos == NO_SUBWORD else pack.labels[int(best[row, pos])] for pos in enc.words[i]]
            else:
                out[i] = pack.labels[int(best[row])]
    return out


def per_cell_evaluate(model, pack, tokenizer, examples) -> dict[str, float]:
    """BASELINE: ``evaluate_model`` / ``predict_model`` before issue 20."""
    device = next(model.parameters()).device
    max_len = fit_seq_len(128, model, explicit=False)
    return score(pack, examples, per_cell_predict(lambda b: model(**b).logits, pack, tokenizer, examples, device,
                                                  max_len=max_len))


def per_cell_row(base, pack, examples, task_mods, lang_mods, references) -> dict[str, float]:
    """BASELINE: ``xlpeft.matrix.matrix_row`` before issue 20: ``compose`` (a fresh model) per cell."""
    key = METRICS[pack.metric]
    row = {}
    for tm, task_mod in task_mods.items():
        for lm, lang_mod in lang_mods.items():
            row[f"{lm}+{tm}"] = per_cell_evaluate(compose(base, [lang_mod, task_mod]), pack, base.tokenizer, examples)[key]
        row[f"{BASELINE}+{tm}"] = per_cell_evaluate(compose(base, references[tm]), pack, base.tokenizer, examples)[key]
    return row


# ---- the matrix: a tiny base, modules trained a few steps on random ids (the tests' helper), NER-shaped examples
def sentences(n: int, seed: int, words: tuple[int, int]) -> list[TokenExample]:
    """``n`` NER sentences of ``words`` (min, max) words: filler words with an entity (B-PER/ORG/LOC) one in five."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(*words)):
            if rng.random() < 0.2:
                tag = rng.choice(list(ENTITIES))
                tokens.append(rng.choice(ENTITIES[tag]))
            else:
                tag = "O"
                tokens.append(rng.choice(SW_WORDS + EN_WORDS))
            tags.append(tag)
        out.append(TokenExample(tuple(tokens), tuple(tags)))
    return out


def lines(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n)]


def build(root: Path, n: int, words: tuple[int, int]):
    """(base, pack, examples by language, task modules, language modules by language, baseline stacks)."""
    texts = lines(SW_WORDS, 300, 0) + lines(EN_WORDS, 300, 1)  # as tests/conftest.py's base_dirs
    base_dir = build_tiny_base("tiny-bert", root / "base", texts, vocab_size=200)
    base, pack = load_base(str(base_dir)), load_task_pack("ner")
    lang_mods = {lang: {m: train_module(base, pack, m, "language", lang, root / f"{lang}-{m}", seed)
                        for m in LANG_METHODS} for seed, lang in enumerate((SOURCE, *LANGS))}
    task_mods = {m: train_module(base, pack, m, "task", "ner", root / f"ner-{m}", 100 + i)
                 for i, m in enumerate(TASK_METHODS)}
    references = {tm: [lang_mods[SOURCE][lm], task_mods[tm]] for tm, lm in zip(TASK_METHODS, LANG_METHODS, strict=True)}
    examples = {lang: sentences(n, seed, words) for seed, lang in enumerate(LANGS)}
    return base, pack, examples, task_mods, lang_mods, references


def run_per_cell(base, pack, examples, task_mods, lang_mods, references) -> dict[str, dict[str, float]]:
    return {lang: per_cell_row(base, pack, ex, task_mods, lang_mods[lang], references) for lang, ex in examples.items()}


def run_in_place(base, pack, examples, task_mods, lang_mods, references) -> dict[str, dict[str, float]]:
    scorer = Scorer(base)  # as evaluate_matrix: one per command, each row prepared once
    rows = {lang: matrix_row(scorer, scorer.prepare(pack, ex), task_mods, lang_mods[lang], references)
            for lang, ex in examples.items()}
    scorer.close()
    return rows


def forward_seconds(base, pack, examples, task_mods, lang_mods, references) -> tuple[float, float]:
    """(wall, CPU) seconds of the in-place path's forward passes alone: the floor both paths share."""
    scorer, wall, cpu = Scorer(base), 0.0, 0.0
    for lang, ex in examples.items():
        data = scorer.prepare(pack, ex)
        cells = [[lm, tm] for tm in task_mods.values() for lm in lang_mods[lang].values()] + list(references.values())
        for modules in cells:
            with scorer.in_place.composed(modules) as model, torch.no_grad():
                start, start_cpu = time.perf_counter(), time.process_time()
                for _, inputs in data.batches:
                    model(**inputs)
                wall, cpu = wall + time.perf_counter() - start, cpu + time.process_time() - start_cpu
    scorer.close()
    return wall, cpu


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=256, help="evaluation sentences per language")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (per-cell, in place); each figure is a median")
    ap.add_argument("--words", default="5-30", help="words per sentence, MIN-MAX (5-30: treebank-like; 3-10: WikiANN-like)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        words = tuple(int(x) for x in args.words.split("-"))
        matrix = build(Path(tmp), args.sentences, words)
        cells = sum(len(matrix[3]) * (len(matrix[4][lang]) + 1) for lang in LANGS)
        scored = args.sentences * cells
        times: dict[str, list[float]] = {"per-cell (today)": [], "in place (new)": []}
        cpu: dict[str, list[float]] = {k: [] for k in times}
        floor: list[tuple[float, float]] = []
        for r in range(args.repeats):
            results = {}
            for label, fn in zip(times, (run_per_cell, run_in_place), strict=True):
                start, start_cpu = time.perf_counter(), time.process_time()
                results[label] = fn(*matrix)
                times[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)
            floor.append(forward_seconds(*matrix))
            same = results["per-cell (today)"] == results["in place (new)"]
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s ({cpu[k][-1]:.2f} CPU s)" for k, v in times.items())
                  + f"; matrices equal: {same}", flush=True)
            if not same:
                sys.exit(f"the two paths disagree: {results}")
    print(f"\nmachine: {platform.platform()}, {cpu_model()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"matrix: {len(LANGS)} languages x {len(LANG_METHODS) * len(TASK_METHODS)} compositions "
          f"({'/'.join(LANG_METHODS)} under {'/'.join(TASK_METHODS)}) + {len(TASK_METHODS)} baseline columns = "
          f"{cells} cells, {args.sentences} NER sentences ({args.words} words) per language, tiny BERT (2 x 32)")
    print(f"command: .venv/bin/python benchmarks/eval_matrix.py --sentences {args.sentences} --repeats {args.repeats} "
          f"--words {args.words}"
          + (f" --threads {args.threads}" if args.threads else ""))
    print("\n| path | median s | sentences/s | median CPU s | sentences per CPU s |\n|---|---|---|---|---|")
    medians = {k: statistics.median(v) for k, v in times.items()}
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    for label, t in medians.items():
        print(f"| {label} | {t:.2f} | {scored / t:,.0f} | {cpu_medians[label]:.2f} | {scored / cpu_medians[label]:,.0f} |")
    ratio = medians["per-cell (today)"] / medians["in place (new)"]
    cpu_ratio = cpu_medians["per-cell (today)"] / cpu_medians["in place (new)"]
    print(f"\nthroughput ratio in place / per-cell: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU "
          f"(goal >= 3x: {'met' if ratio >= 3 else 'MISSED'})")
    fwd, fwd_cpu = statistics.median(f[0] for f in floor), statistics.median(f[1] for f in floor)
    print(f"the forward passes alone (same batches, same models): {fwd:.2f} s ({fwd_cpu:.2f} CPU s), "
          f"{fwd_cpu / cpu_medians['in place (new)']:.0%} of the in-place path's CPU time; a path that did "
          f"nothing else would be {cpu_medians['per-cell (today)'] / fwd_cpu:.2f}x the per-cell path (CPU)")


if __name__ == "__main__":
    main()
