"""Held-out MLM loss of sparse language deltas at equal K and equal training steps, one per selection (issue 19).

    .venv/bin/python benchmarks/sft_quality.py                       # e5-small-bible, Indonesian Bible, 200 steps
    .venv/bin/python benchmarks/sft_quality.py --lang sw --steps 400 --selections magnitude,dynamic

Every row is one ``xlpeft train-lang --method sft`` run on the same base, corpus, seed, K (the
method's default for the base unless ``--k``), batch and sequence length; only ``selection`` (and
with it the phase structure) differs:

* magnitude / movement / diff_pruning: LT-SFT's two phases, ``steps / 2`` each;
* fisher: ``fisher_samples`` examples of squared gradients at theta0 (no training), then ``steps``
  sparse steps: the accumulation is not counted as training;
* dynamic (rigl, sm3): ``steps`` sparse steps from a random start, SpIEL's drop and grow.

The figure is the run's own held-out MLM loss after training (``training.eval_loss`` in the
module's ``xlpeft.json``): the same held-out blocks of the corpus for every row (fixed by corpus and
seed) and the same masking. No hyper-parameter is tuned here; the learning rate is sft's default
(5e-5, composable-sft's) unless ``--lr``. Prints the machine, the command of every run, its
time in the training loops (from the module's manifest), and the loss relative to the magnitude
(LT-SFT) row. ``--reuse`` reports finished runs of the same arguments found in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "magnitude": ["selection=magnitude"],
    "movement": ["selection=movement"],
    "fisher": ["selection=fisher"],
    "diff_pruning": ["selection=diff_pruning"],
    "dynamic": ["selection=dynamic", "growth=rigl"],
    "dynamic-sm3": ["selection=dynamic", "growth=sm3"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="e5-small-bible")
    ap.add_argument("--lang", default="id")
    ap.add_argument("--corpus", default="offline", help="as train-lang's --corpus (offline: the pack's Bible/UDHR text)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--k", type=int, default=None, help="K (default: sft's scaled default for the base)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--selections", default=",".join(VARIANTS))
    ap.add_argument("--workdir", default="benchmarks/.sft-quality", help="modules and logs go here")
    ap.add_argument("--reuse", action="store_true",
                    help="report a finished run found in --workdir instead of training it again (same arguments!)")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)  # also the runs' cwd: their MLflow store is work/mlflow.db
    xlpeft = [sys.executable, "-m", "xlpeft"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for prep in (["prepare-base", args.base], ["prepare-data", "bible"]):
        subprocess.run(xlpeft + prep, check=True, env=env, stdout=subprocess.DEVNULL, cwd=work)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
          flush=True)
    rows = []
    for name in args.selections.split(","):
        out = work / f"lang-{args.lang}-{name}-s{args.seed}"
        cmd = xlpeft + ["train-lang", "--lang", args.lang, "--method", "sft", "--base", args.base, "--corpus", args.corpus,
                        "--max-steps", str(args.steps), "--batch-size", str(args.batch), "--seed", str(args.seed),
                        "--set", f"max_seq_len={args.seq}", "--output", str(out), "--overwrite"]
        for setting in VARIANTS[name] + ([f"num_params={args.k}"] if args.k else []) + ([f"lr={args.lr}"] if args.lr else []):
            cmd += ["--set", setting]
        print("$", " ".join(cmd[2:]), flush=True)
        if not (args.reuse and (out / "xlpeft.json").exists()):
            with open(work / f"{out.name}.log", "w") as log:
                subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
        manifest = json.loads((out / "xlpeft.json").read_text())
        training = manifest["training"]
        seconds = sum(phase["seconds"] for phase in training["phases"].values())  # the training loops' own time
        print(f"  {name}: K {manifest['trainable_parameters']:,}, held-out MLM loss {training['eval_loss_before']:.4f} -> "
              f"{training['eval_loss']:.4f}", flush=True)
        rows.append((name, manifest["trainable_parameters"], training["eval_loss_before"], training["eval_loss"], seconds))
    ref = next((r for r in rows if r[0] == "magnitude"), rows[0])
    print(f"\n{args.base}, {args.lang} ({args.corpus}), {args.steps} training steps, batch {args.batch} x {args.seq}, "
          f"seed {args.seed}")
    print("| selection | K used | held-out MLM loss before | after | vs magnitude | training s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, k, before, after, seconds in rows:
        print(f"| {name} | {k:,} | {before:.4f} | {after:.4f} | {(after / ref[3] - 1) * 100:+.2f}% | {seconds:.0f} |")


if __name__ == "__main__":
    main()
