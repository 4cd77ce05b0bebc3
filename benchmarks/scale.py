"""Corpus scale: peak RSS and time to the first optimizer step of ``train-lang`` against corpus size; cold tokenising
throughput of the token store against ``datasets.map(batched=True)`` (issue 20).

    .venv/bin/python benchmarks/scale.py                         # 8.9 MB and 890 MB corpora, tiny base
    .venv/bin/python benchmarks/scale.py --sizes-mb 8.9,89       # smaller
    .venv/bin/python benchmarks/scale.py --base ~/.cache/xlpeft/bases/e5-small-bible --sizes-mb 8.9,89

What it does, in a temporary folder (nothing is downloaded):

* corpora: the small one is random 12-word lines over a 1,000-word vocabulary of 3-9 random
  lower-case letters (seed 0); a larger one is that text repeated with its lines shuffled by a new
  seed each time, so the tokenizer sees the same words in another order (memory and throughput do
  not depend on which sentences they are);
* ``train-lang``: ``xlpeft train-lang --method adapter --max-steps 2 --set max_seq_len=128`` (the
  issue's setting) as a child process, once with an empty token cache (cold: validation,
  fingerprint and tokenising) and once again with it (warm); peak RSS is the child's
  ``ru_maxrss`` from ``wait4`` (its own resident peak; the tokenising workers it forks are
  separate processes and are reported by the cold-tokenising rows); time to the first optimizer
  step is from ``Popen`` to the first ``AdamW.step`` call, which a wrapper around ``python -m xlpeft``
  prints (the wrapper changes nothing else);
* tokenising throughput: :func:`xlpeft.data.token_store.open_store` with ``--processes`` workers
  against ``datasets.load_dataset("text") + .map(tokenizer(batch["text"]), batched=True,
  num_proc=--processes)`` on the same file with the same fast tokenizer, each from a cold cache of
  its own, MB of text per second, the Arrow conversion counted for ``datasets``.

Goals (issue 20): peak RSS of the 100x corpus <= 1.2x the small one's; warm time to the first step <= 10 s at
every size; cold throughput >= datasets.map's. Not part of ``make test``; with the defaults about 10 minutes on 2
CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WRAPPER = """
import sys, time, torch
_step = torch.optim.AdamW.step
def _first(self, *a, **k):
    if not getattr(torch.optim.AdamW, "_seen", False):
        torch.optim.AdamW._seen = True
        print(f"FIRST_STEP {time.time():.6f}", file=sys.stderr, flush=True)
    return _step(self, *a, **k)
torch.optim.AdamW.step = _first
from xlpeft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def make_corpus(path: Path, megabytes: float, small: Path | None) -> Path:
    """``megabytes`` of text at ``path``: random lines, or ``small``'s lines reshuffled until the size is reached."""
    target = int(megabytes * 1e6)
    if small is None:
        rng = random.Random(0)
        vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(1000)]
        with path.open("w", encoding="utf-8") as fh:
            written = 0
            while written < target:
                line = " ".join(rng.choice(vocab) for _ in range(12)) + "\n"
                fh.write(line)
                written += len(line)
        return path
    lines = small.read_text(encoding="utf-8").splitlines(keepends=True)
    with path.open("w", encoding="utf-8") as fh:
        written, seed = 0, 1
        while written < target:
            random.Random(seed).shuffle(lines)
            for line in lines:
                fh.write(line)
                written += len(line)
                if written >= target:
                    break
            seed += 1
    return path


def train_lang(base: str, corpus: Path, work: Path, tag: str) -> dict:
    """One ``train-lang`` child: peak RSS (MiB), seconds to the first optimizer step, wall seconds, cache hit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "XLPEFT_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", WRAPPER, "train-lang", "--lang", "sw", "--method", "adapter", "--base", base,
           "--corpus", str(corpus), "--max-steps", "2", "--set", "max_seq_len=128", "--output",
           str(work / f"modules/{tag}"), "--overwrite"]
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    if status != 0:
        raise SystemExit(f"train-lang failed ({status}):\n{err[-3000:]}")
    first = next(float(line.split()[1]) for line in err.splitlines() if line.startswith("FIRST_STEP"))
    return {"rss_mib": usage.ru_maxrss / 1024, "first_step_s": first - start, "wall_s": wall,
            "cache": "hit" if "token cache hit" in err else "built"}


def throughput(base: str, corpus: Path, work: Path, processes: int) -> dict:
    """MB/s of the token store and of datasets.map on ``corpus``, each from an empty cache."""
    from datasets import disable_progress_bars, load_dataset

    from xlpeft.data.corpora import CorpusSpec
    from xlpeft.data.token_store import open_store
    from xlpeft.models import load_base

    disable_progress_bars()
    tokenizer = load_base(base).tokenizer
    mb = corpus.stat().st_size / 1e6
    start = time.perf_counter()
    store = open_store([CorpusSpec(path=str(corpus))], tokenizer, 0, root=work / "store", workers=processes,
                       progress=False)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    ds = load_dataset("text", data_files=str(corpus), split="train", cache_dir=str(work / "hf"))
    ds = ds.map(lambda b: tokenizer(b["text"], add_special_tokens=False), batched=True, num_proc=processes,
                remove_columns=["text"])
    theirs = time.perf_counter() - start
    return {"mb": mb, "ours_s": ours, "datasets_s": theirs, "ours_mb_s": mb / ours, "datasets_mb_s": mb / theirs,
            "ratio": theirs / ours, "tokens": int(store.meta["n_tokens"]), "datasets_rows": len(ds)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", default="8.9,890", help="corpus sizes; the first is the reference")
    ap.add_argument("--base", default=None, help="a base directory (default: a tiny XLM-R-shaped base built here)")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="tokenising processes, both sides")
    ap.add_argument("--throughput-mb", type=float, default=89.0, help="corpus size for the throughput rows")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    sizes = [float(s) for s in args.sizes_mb.split(",")]
    with tempfile.TemporaryDirectory(prefix="xlpeft-scale-") as tmp:
        work = Path(tmp)
        base = args.base
        if base is None:
            from tests.conftest import EN_WORDS, SW_WORDS, make_lines
            from xlpeft.models import build_tiny_base

            base = str(build_tiny_base("tiny-xlmr", work / "base",
                                       make_lines(SW_WORDS, 300) + make_lines(EN_WORDS, 300, seed=1), vocab_size=200))
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), {platform.platform()}; base {base}")
        small = make_corpus(work / "c0.txt", sizes[0], None)
        corpora = [small] + [make_corpus(work / f"c{i}.txt", mb, small) for i, mb in enumerate(sizes[1:], 1)]
        rows = []
        for corpus, mb in zip(corpora, sizes, strict=True):
            for phase in ("cold", "warm"):
                r = train_lang(base, corpus, work, f"m{mb}")
                rows.append({"corpus_mb": mb, "phase": phase, **r})
                print(f"train-lang {mb:>7.1f} MB {phase}: peak RSS {r['rss_mib']:7.0f} MiB, first step "
                      f"{r['first_step_s']:6.1f} s, whole process {r['wall_s']:6.1f} s (token cache {r['cache']})",
                      flush=True)
        ref = {r["phase"]: r["rss_mib"] for r in rows if r["corpus_mb"] == sizes[0]}
        for r in rows:
            r["rss_vs_small"] = r["rss_mib"] / ref[r["phase"]]
        big = [r for r in rows if r["corpus_mb"] == sizes[-1]]
        print(f"peak RSS, {sizes[-1]:g} MB vs {sizes[0]:g} MB: " + ", ".join(
            f"{r['phase']} {r['rss_vs_small']:.2f}x" for r in big) + " (goal <= 1.2x)")
        warm = max(r["first_step_s"] for r in rows if r["phase"] == "warm")
        print(f"warm time to the first step, slowest size: {warm:.1f} s (goal <= 10 s)")
        tp_corpus = make_corpus(work / "tp.txt", args.throughput_mb, small)
        tp = throughput(base, tp_corpus, work, args.processes)
        print(f"cold tokenising, {tp['mb']:.1f} MB, {args.processes} process(es): token store {tp['ours_mb_s']:.2f} "
              f"MB/s ({tp['ours_s']:.1f} s), datasets.map(batched=True) {tp['datasets_mb_s']:.2f} MB/s "
              f"({tp['datasets_s']:.1f} s): {tp['ratio']:.2f}x (goal >= 1x)")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "throughput": tp, "base": base,
                                                   "processes": args.processes}, indent=1))


if __name__ == "__main__":
    main()
