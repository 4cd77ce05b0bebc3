"""The whole ``xlpeft train-lang`` process against AdapterHub doing the same steps (issue 20's fixed costs).

    bash benchmarks/setup_adapterhub.sh && .venv/bin/python benchmarks/cli_whole.py       # 10 steps, 8 x 256
    .venv/bin/python benchmarks/cli_whole.py --steps 6 --rounds 1

A short run pays fixed costs (imports, loading the base, fingerprints, tokenising, MLflow, the held-out
evaluations) that a step-time comparison hides: issue 20 measured the 6-step ``train-lang`` at 0.96x
AdapterHub's whole process although its steps were 1.79x faster. This measures it end to end:

* the base: ``run.py``'s random-weight mBERT-base-shaped ``BertForMaskedLM`` (seed 0) with a word-level
  tokenizer that splits on spaces, so the CLI can read text; the corpus: random words of that vocabulary,
  12 a line, enough for the run and its held-out blocks;
* AdapterHub: ``adapterhub_side.py --warmup 0 --steps N`` in its own venv (MAD-X ``SeqBnInvConfig``, reduction
  factor 16, on pre-tokenised batches: no text, no evaluation, no tracking; the least an AdapterHub user runs);
* xlpeft: ``python -m xlpeft train-lang --method adapter --set reduction_factor=16 --max-steps N --batch-size 8
  --set max_seq_len=256`` with an MLflow sqlite store, the default held-out evaluation budget, checkpoints
  off: "cold" with an empty ``$XLPEFT_CACHE`` (the base is hashed, the corpus tokenised, the loss before
  training computed), then "warm" (the same command again: those come from the cache);
* each command a child process timed from ``Popen`` to exit, peak RSS its ``ru_maxrss``; the sides alternate
  (AdapterHub, xlpeft cold, xlpeft warm, per round) so a slowdown of the shared machine hits all of them;
  the ratio is AdapterHub's median over xlpeft's.

Goal (issue 20): xlpeft's whole process >= 1.5x AdapterHub's. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import SHAPES, build_data, build_model_dir, cpu_model  # noqa: E402


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall seconds from Popen to exit, peak RSS GiB) of one child; its output is kept on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({status}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--adapterhub-python", default=str(HERE / ".venv-adapterhub/bin/python"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not Path(args.adapterhub_python).exists():
        raise SystemExit(f"Error: no AdapterHub venv at {args.adapterhub_python}; run `bash benchmarks/setup_adapterhub.sh`")
    shape, batch, seq = SHAPES["mbert"], 8, 256
    with tempfile.TemporaryDirectory(prefix="xlpeft-cli-whole-") as tmp:
        work = Path(tmp)
        model = build_model_dir(shape, work / "mbert")
        spec = json.loads((model / "tokenizer.json").read_text())
        spec["pre_tokenizer"] = {"type": "WhitespaceSplit"}  # words of the corpus are vocabulary entries
        (model / "tokenizer.json").write_text(json.dumps(spec))
        build_data(shape, model, args.steps, batch, seq, work / "data.pt")
        rng = random.Random(0)
        n_lines = (args.steps * batch * seq * 2) // 12 + 2000  # the run's blocks twice over, and a held-out 5%
        with (work / "corpus.txt").open("w") as fh:
            for _ in range(n_lines):
                fh.write(" ".join(f"tok{rng.randint(1000, shape.vocab - 1)}" for _ in range(12)) + "\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
        ah = [args.adapterhub_python, str(HERE / "adapterhub_side.py"), "--model-dir", str(model), "--data",
              str(work / "data.pt"), "--warmup", "0", "--steps", str(args.steps), "--out", str(work / "ah.json")]
        xl = [sys.executable, "-m", "xlpeft", "train-lang", "--lang", "sw", "--method", "adapter", "--base", str(model),
              "--corpus", str(work / "corpus.txt"), "--max-steps", str(args.steps), "--batch-size", str(batch),
              "--set", f"max_seq_len={seq}", "--set", "reduction_factor=16", "--set", "lr=1e-4",
              "--set", "checkpoint_every=0", "--output", str(work / "module"), "--overwrite"]
        print(f"machine: {cpu_model()}, {os.cpu_count()} CPU(s); {args.steps} steps of batch {batch} x {seq}, "
              f"{args.rounds} round(s)", flush=True)
        times: dict[str, list[float]] = {"AdapterHub adapters 1.3.0": [], "xlpeft train-lang, cold cache": [],
                                         "xlpeft train-lang, warm cache": []}
        rss: dict[str, list[float]] = {k: [] for k in times}
        for r in range(args.rounds):
            cache = work / f"cache{r}"
            shutil.rmtree(cache, ignore_errors=True)
            for name, cmd in zip(times, (ah, xl, xl), strict=True):
                wall, peak = timed(cmd, {**env, "XLPEFT_CACHE": str(cache)}, work)
                times[name].append(wall)
                rss[name].append(peak)
                print(f"  round {r + 1}: {name:<32} {wall:7.1f} s   peak RSS {peak:5.2f} GiB", flush=True)
        ref = statistics.median(times["AdapterHub adapters 1.3.0"])
        print(f"\n| side | whole process s (median of {args.rounds}) | speed-up | peak RSS GiB |\n|---|---:|---:|---:|")
        for name, walls in times.items():
            med = statistics.median(walls)
            print(f"| {name} | {med:.1f} | {ref / med:.2f}x | {max(rss[name]):.2f} |")
        print("goal: >= 1.5x (issue 20)")
        if args.json:
            Path(args.json).write_text(json.dumps({"times": times, "rss": rss, "steps": args.steps}, indent=1))


if __name__ == "__main__":
    main()
