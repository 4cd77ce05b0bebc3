"""Memory and speed of LT-SFT's phases against full fine-tuning, on an mBERT-base-shaped model.

    .venv/bin/python benchmarks/sft_memory.py                  # CPU, 8 steps a phase, batch 8 x 256, K = 7,667,712
    .venv/bin/python benchmarks/sft_memory.py --device cuda --steps 10

The model is ``BertForMaskedLM`` built from a config with mBERT-base's shapes (vocabulary 119,547,
hidden 768, 12 layers) and random weights: nothing is downloaded, and memory and speed do not
depend on the values. Every row runs the code ``train-lang`` runs (``train_loop``, ``mlm_loss``,
``SFTTrainable``) on random token ids with 15% of positions masked:

  (a) full fine-tuning: AdamW on every maskable weight (the same set LT-SFT's phase 1 trains);
  (b) LT-SFT phase 1: the same, plus the theta0 copy (and movement scores with --selection movement);
  (c) selection of K entries (streamed top-K), timed;
  (d) LT-SFT phase 2: AdamW on the K selected entries only;
  (f) the FISH mask (``selection=fisher``): squared gradients at theta0 over ``--fisher-batches``
      batches, then the same top-K; its overlap with (c)'s magnitude mask is printed under the table;
  (e) SpIEL's dynamic delta (``selection=dynamic``): AdamW on K entries from the first step, with a
      gradient window (K candidates per tensor: indices, sums, squares, counts: +20 bytes per entry) and a drop-and-grow reselection.

How it measures:

* peak memory: the process's resident set size sampled every 5 ms over the phase by
  :class:`~xlpeft.methods.sft.memory.PeakMemory` (``torch.cuda.max_memory_allocated`` on CUDA);
  between rows freed memory goes back to the OS (``gc.collect`` + glibc's ``malloc_trim``) so a
  row does not inherit the previous row's peak. glibc raises its mmap threshold as large blocks
  are freed, after which freed activations and per-tensor gradients stay in its heap and count
  in RSS (about +1.2 GiB on phase 2 here, depending on what ran before), so the script
  re-executes itself with ``MALLOC_MMAP_THRESHOLD_=131072`` (fixed at 128 KiB) to make RSS track
  live tensors; ``--default-malloc`` keeps glibc's behaviour;
* steps/s: one over the median wall time of a step, the first step (which allocates AdamW's
  state) excluded; CPU s/step: the median process CPU time of a step, which other processes on a
  shared machine disturb less than wall time (compare phases by it when the machine is busy);
* grads kept: gradients alive from backward to the next step (dense for (a) and (b); in (d) each
  weight's dense gradient lives only until its K_i entries are gathered, then ``v.grad`` is kept);
* optimizer state: computed, AdamW keeps two fp32 buffers per trainable entry;
* method state: what the method keeps beside the model: theta0 (and movement scores) in phase 1;
  indices (int64) + values + theta0 at the indices in phase 2.

With ``--activation-checkpointing`` every row after (a) runs with the encoder layers checkpointed
(``--set activation_checkpointing=true``: each layer's activations recomputed in the backward pass)
and a row (a') adds full fine-tuning checkpointed; every ratio stays against (a), uncheckpointed.

Not part of ``make test``; about 1-2 minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xlpeft.config import TrainConfig  # noqa: E402
from xlpeft.methods.sft import PeakMemory, SFTConfig, SFTTrainable, maskable_parameters  # noqa: E402
from xlpeft.methods.sft.memory import rss_bytes  # noqa: E402
from xlpeft.models import ARCHITECTURES, Base  # noqa: E402
from xlpeft.recompute import checkpointed_activations, recompute_count  # noqa: E402
from xlpeft.training import mlm_loss, train_loop  # noqa: E402

MB = 2**20
MASK_ID = 103  # [MASK] in mBERT's vocabulary


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def build_base(device: str) -> Base:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=119_547, hidden_size=768, num_hidden_layers=12,
                                       num_attention_heads=12, intermediate_size=3072))
    for p in model.parameters():
        p.requires_grad_(False)
    return Base(name="mbert-base-shaped (random)", path=Path("."), model=model.to(device),
                tokenizer=SimpleNamespace(pad_token_id=0), fingerprint="random", arch=ARCHITECTURES["bert"])


def mlm_batches(batch: int, seq: int, vocab: int, device: str, seed: int = 0):
    """Endless (input_ids, labels) with 15% of positions masked; no padding."""
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(1000, vocab, (batch, seq), generator=g)  # (B, T)
        masked = torch.rand((batch, seq), generator=g) < 0.15
        yield ids.masked_fill(masked, MASK_ID).to(device), ids.masked_fill(~masked, -100).to(device)


def run_phase(base, params, cfg, steps, data, after_step=None, checkpointed=False) -> tuple[float, float]:
    """(steps/s, CPU s/step median, CPU s/step mean) over the steps; the first (AdamW allocates its state) is excluded.

    The median is a typical step; the mean also carries the rarer steps (a dynamic delta's gradient
    window and reselection), here at a higher rate than in a real run (3 of 7 timed steps, against
    6 of 20 with SpIEL's defaults)."""
    stamps = []

    def stamp(step: int) -> None:
        if after_step is not None:
            after_step(step)
        stamps.append((time.perf_counter(), time.process_time()))

    with checkpointed_activations(base.model, checkpointed):
        train_loop(params, data, lambda b: mlm_loss(base, *b), cfg, steps, lambda *_: None, after_step=stamp, desc="bench")
    pairs = list(zip(stamps, stamps[1:], strict=False))
    wall = statistics.median(b[0] - a[0] for a, b in pairs)
    cpu = [b[1] - a[1] for a, b in pairs]
    return 1.0 / wall, statistics.median(cpu), statistics.mean(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per training phase (>= 2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--k", type=int, default=7_667_712, help="entries kept (LT-SFT language SFT: 7,667,712)")
    ap.add_argument("--rows", default="lt-sft,fisher,dynamic-rigl,dynamic-sm3",
                    help="comma list of row groups: lt-sft, fisher (needs lt-sft: its mask overlap), dynamic-rigl, "
                         "dynamic-sm3, modes (also entry_gradients=sampled/dense for phase 2 and autograd for sm3)")
    ap.add_argument("--fisher-batches", type=int, default=2, help="FISH: batches of squared gradients (the paper: 1024 "
                    "examples, 128 batches of 8; each costs one forward and backward)")
    ap.add_argument("--selection", default="magnitude", choices=("magnitude", "movement"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="run every row after (a) with the encoder layers checkpointed (--set activation_checkpointing="
                         "true), and add (a') full fine-tuning checkpointed; the ratios stay against (a), uncheckpointed")
    args = ap.parse_args()
    args.rows = set(args.rows.split(","))
    if args.device == "cpu" and not args.default_malloc and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})

    base = build_base(args.device)
    model_mb = sum(p.numel() * p.element_size() for p in base.model.parameters()) / MB
    release_memory()
    idle_mb = rss_bytes() / MB if args.device == "cpu" else torch.cuda.memory_allocated() / MB
    cfg = TrainConfig(lr=5e-5, max_steps=2 * args.steps, batch_size=args.batch, log_every=10**6, device=args.device)
    sft_cfg = SFTConfig(num_params=args.k, selection=args.selection, full_steps=args.steps, sparse_steps=args.steps)
    maskable = maskable_parameters(base, sft_cfg)
    n = sum(p.numel() for p in maskable.values())
    data = mlm_batches(args.batch, args.seq, base.model.config.vocab_size, args.device)
    base.model.train()
    rows: list[dict] = []
    notes: list[str] = []

    # (a) full fine-tuning of the maskable weights
    meter = PeakMemory(args.device)
    meter.start()
    for p in maskable.values():
        p.requires_grad_(True)
    speed = run_phase(base, list(maskable.values()), cfg, args.steps, data)
    rows.append(dict(name="(a) full fine-tuning", trainable=n, grads=4 * n, optimizer=8 * n, state=0, peak=meter.stop(),
                     speed=speed))
    for p in maskable.values():
        p.grad = None
    release_memory()
    ckpt = args.activation_checkpointing
    if ckpt:  # (a') the same, checkpointed: what checkpointing alone buys full fine-tuning
        meter = PeakMemory(args.device)
        meter.start()
        speed = run_phase(base, list(maskable.values()), cfg, args.steps, data, checkpointed=True)
        rows.append(dict(name="(a') full fine-tuning, checkpointed", trainable=n, grads=4 * n, optimizer=8 * n,
                         state=0, peak=meter.stop(), speed=speed))
        for p in maskable.values():
            p.grad = None
        release_memory()
    for p in maskable.values():
        p.requires_grad_(False)

    # (b) - (d): LT-SFT through the Trainable protocol, as train-lang runs it
    if "lt-sft" in args.rows:
        trainable = SFTTrainable(base, replace(sft_cfg, entry_gradients="autograd"), cfg)
        full, sparse = trainable.phases
        params = trainable.begin_phase(full)
        speed = run_phase(base, params, cfg, full.steps, data, lambda step: trainable.after_step(full, step), ckpt)
        release_memory()
        metrics = trainable.end_phase(full)  # selection happens here, after phase 1's peak is taken
        state = 4 * n * (2 if args.selection == "movement" else 1)  # theta0 (+ movement scores)
        rows.append(dict(name=f"(b) LT-SFT phase 1 ({args.selection})", trainable=n, grads=4 * n, optimizer=8 * n,
                         state=state, peak=metrics["full_peak_memory_mb"], speed=speed))
        rows.append(dict(name=f"(c) selection of K={args.k:,}", trainable=0, grads=0, optimizer=0, state=0,
                         peak=metrics["selection_peak_memory_mb"], seconds=metrics["selection_seconds"]))
        release_memory()
        mask = dict(trainable.indices)
        params = trainable.begin_phase(sparse)
        k = sum(p.numel() for p in params)
        speed = run_phase(base, params, cfg, sparse.steps, data, lambda step: trainable.after_step(sparse, step), ckpt)
        metrics = trainable.end_phase(sparse)
        rows.append(dict(name="(d) LT-SFT phase 2, entry_gradients=autograd", trainable=k, grads=4 * k, optimizer=8 * k,
                         state=16 * k, peak=metrics["sparse_peak_memory_mb"], speed=speed))
        trainable.close()
        release_memory()
        if "fisher" in args.rows:  # FISH: squared gradients at theta0 over a few batches, then the same top-K
            fish = SFTTrainable(base, replace(sft_cfg, selection="fisher", full_steps=max(2, args.fisher_batches)), cfg)
            fisher_phase = fish.phases[0]
            params = fish.begin_phase(fisher_phase)
            start = time.perf_counter()
            speed = run_phase(base, params, cfg, fisher_phase.steps, data, checkpointed=ckpt)
            accumulate_s = time.perf_counter() - start
            metrics = fish.end_phase(fisher_phase)  # the selection
            overlap = sum(int(torch.isin(fish.indices[n], mask[n]).sum()) for n in fish.indices if n in mask)
            rows.append(dict(name=f"(f) FISH mask: {fisher_phase.steps} batches at theta0", trainable=0, grads=0,
                             optimizer=0, state=4 * n, peak=metrics["full_peak_memory_mb"], speed=speed))
            rows.append(dict(name=f"(f) FISH selection of K={args.k:,}", trainable=0, grads=0, optimizer=0, state=0,
                             peak=metrics["selection_peak_memory_mb"], seconds=metrics["selection_seconds"]))
            notes.append(f"FISH mask: {fisher_phase.steps} batches of {args.batch} x {args.seq} accumulated in "
                         f"{accumulate_s:.1f} s, selected in {metrics['selection_seconds']:.1f} s; "
                         f"{overlap:,} of its {args.k:,} entries ({overlap / args.k:.1%}) are also in the magnitude mask "
                         f"after {args.steps} phase-1 steps (random weights and tokens: compare with a real model too)")
            fish.close()
            release_memory()
        for mode in ("auto",) + (("sampled", "dense") if "modes" in args.rows else ()):
            # the same mask, its gradients from the taps (no dense weight gradient)
            trainable = SFTTrainable(base, replace(sft_cfg, selection="random", full_steps=0, entry_gradients=mode), cfg)
            (sparse,) = trainable.phases
            trainable.indices = {name: idx.clone() for name, idx in mask.items()}
            params = trainable.begin_phase(sparse)
            speed = run_phase(base, params, cfg, sparse.steps, data, lambda step, t=trainable, ph=sparse: t.after_step(ph, step),
                              ckpt)
            metrics = trainable.end_phase(sparse)
            rows.append(dict(name=f"(d) LT-SFT phase 2, entry_gradients={mode} ({_tapped(metrics)})", trainable=k,
                             grads=4 * k, optimizer=8 * k, state=16 * k, peak=metrics["sparse_peak_memory_mb"], speed=speed))
            trainable.close()
            release_memory()

    # (e) SpIEL's dynamic delta: no dense phase; with reselect_every 7 and accumulation 2 the 8 steps hold
    # SpIEL's schedule in small: windows at steps 1-2 and 7-8 (steps 1 and 7 rank whole gradients, 2
    # and 8 accumulate at the candidates), a reselection after step 2, steps 3-6 plain
    for growth, mode in [(g, m) for g in ("rigl", "sm3") for m in ("autograd", "auto")]:
        if f"dynamic-{growth}" not in args.rows or (mode == "autograd" and "modes" not in args.rows and growth == "sm3"):
            continue
        dyn_cfg = SFTConfig(num_params=args.k, selection="dynamic", sparse_steps=args.steps, growth=growth,
                            reselect_every=7, accumulation_steps=2, entry_gradients=mode)
        dynamic = SFTTrainable(base, dyn_cfg, cfg)
        (phase,) = dynamic.phases
        params = dynamic.begin_phase(phase)
        k = sum(p.numel() for p in params)
        speed = run_phase(base, params, cfg, phase.steps, data, lambda step, t=dynamic, ph=phase: t.after_step(ph, step),
                          ckpt)
        metrics = dynamic.end_phase(phase)
        rows.append(dict(name=f"(e) dynamic {growth}, entry_gradients={mode} ({int(metrics['reselections'])} reselections"
                              f"{', ' + _tapped(metrics) if mode != 'autograd' else ''})", trainable=k,
                         grads=4 * k, optimizer=8 * k, state=36 * k, peak=metrics["sparse_peak_memory_mb"], speed=speed))
        dynamic.close()
        release_memory()
    print_table(args, rows, n, model_mb, idle_mb)
    if args.activation_checkpointing:
        print(f"every row after (a) ran with activation checkpointing: {recompute_count():,} layer recomputations")
    for note in notes:
        print(note)


def _tapped(metrics: dict) -> str:
    return f"{int(metrics.get('tapped_sampled_tensors', 0))} sampled, {int(metrics.get('tapped_dense_tensors', 0))} dense"


def print_table(args, rows: list[dict], n: int, model_mb: float, idle_mb: float) -> None:
    where = "peak RSS MiB" if args.device == "cpu" else "peak CUDA alloc MiB"
    print(f"mBERT-base-shaped BertForMaskedLM, random weights, {args.device}, {torch.get_num_threads()} threads; "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} steps/phase, torch {torch.__version__}, "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset (glibc default)')}")
    print(f"maskable entries {n:,} (LayerNorms and MLM head frozen; decoder tied to the embeddings); "
          f"weights {model_mb:,.0f} MiB; {'RSS' if args.device == 'cpu' else 'allocated'} with the model loaded: "
          f"{idle_mb:,.0f} MiB")
    columns = ["phase", "trainable entries", "grads kept MiB", "optimizer state MiB", "method state MiB", where, "steps/s",
               "CPU s/step", "CPU s/step mean", "peak vs (a)", "CPU s/step vs (a)"]
    ref = rows[0]
    table = []
    for r in rows:
        timing = (["", f"{r['seconds']:.1f} s in all", "", ""] if "seconds" in r else
                  [f"{r['speed'][0]:.3f}", f"{r['speed'][1]:.1f}", f"{r['speed'][2]:.1f}",
                   f"{r['speed'][1] / ref['speed'][1]:.2f}x"])
        table.append([r["name"], f"{r['trainable']:,}", f"{r['grads'] / MB:,.0f}", f"{r['optimizer'] / MB:,.0f}",
                      f"{r['state'] / MB:,.0f}",
                      f"{r['peak']:,.0f}", *timing[:3], f"{r['peak'] / ref['peak']:.2f}x", timing[3]])
    widths = [max(len(row[i]) for row in [columns, *table]) for i in range(len(columns))]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in table:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
