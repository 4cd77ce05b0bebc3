"""Gradient at a sparse delta's entries: SDDMM ("sampled") against the dense product gathered ("dense"), per shape.

    .venv/bin/python benchmarks/sft_entry_gradients.py                 # mBERT-base shapes, 2,048 tokens
    .venv/bin/python benchmarks/sft_entry_gradients.py --tokens 4096 --densities 0.01,0.03

Times :meth:`xlpeft.methods.sft.taps.LinearPart.at` both ways on random factors (dy, x) for each
weight shape of an mBERT-base layer and the tied MLM decoder (119,547 x 768 at the masked
positions only), entries drawn uniformly at each density: the median of 3 calls after a warm-up.
This is the measurement behind ``taps.SAMPLED_BELOW`` (``entry_gradients=auto``); it depends on the
machine's memory bandwidth against its matmul throughput, so re-run it on yours (and on a GPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xlpeft.methods.sft.taps import SAMPLED_BELOW, Entries, LinearPart  # noqa: E402


def median_seconds(fn, rounds: int = 3) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per batch (8 x 256)")
    ap.add_argument("--masked", type=int, default=307, help="masked positions reaching the decoder (15%% of 2,048)")
    ap.add_argument("--densities", default="0.005,0.02,0.0433,0.1")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}; auto uses sampled below density {SAMPLED_BELOW}")
    print("| weight (rows x cols) | tokens | density | sampled s | dense s | sampled / dense |")
    print("|---|---:|---:|---:|---:|---:|")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    shapes = [((768, 768), args.tokens), ((3072, 768), args.tokens), ((768, 3072), args.tokens),
              ((119_547, 768), args.masked)]
    for (rows, cols), tokens in shapes:
        part = LinearPart(torch.randn(tokens, rows, device=args.device), torch.randn(tokens, cols, device=args.device))
        for density in (float(d) for d in args.densities.split(",")):
            k = int(rows * cols * density)
            entries = Entries(torch.randperm(rows * cols, device=args.device)[:k], (rows, cols))
            sampled = median_seconds(lambda e=entries, p=part: (p.at(e, True), sync()))
            dense = median_seconds(lambda e=entries, p=part: (p.at(e, False), sync()))
            print(f"| {rows} x {cols} | {tokens} | {density:.2%} | {sampled:.4f} | {dense:.4f} | {sampled / dense:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
