"""Task-adapter training step over a language adapter: frozen language adapter (issue 14, defect 4 fixed) vs not.

    .venv/bin/python benchmarks/task_step.py                     # CPU, mBERT-base shape, 8 x 128, ~3 min on 2 cores
    .venv/bin/python benchmarks/task_step.py --steps 20 --seq 256 --device cuda

What ``xlpeft train-task --method adapter`` runs per step, by the same functions, on a random-weight
mBERT-base-shaped ``BertForMaskedLM`` (vocabulary 119,547, 12 x 768, FFN 3072; ``run.py``'s
``build_model_dir``): a MAD-X language adapter (Pfeiffer, reduction factor 2, NICE invertible
adapter; random weights) saved and activated with ``compose.activate``; a task adapter
(``prepare_adapter``, reduction factor 16) and a token-classification head (9 labels) trained by
``train_loop`` with ``task_loss``; dropout on (train mode), AdamW lr 1e-4, clipping 1.0.

Two behaviours in one ``train_loop`` run, interleaved step by step in the order A B B A A B B A ...
so that drift of the shared machine hits both alike:

* ``fixed``: the language adapter as ``activate`` leaves it now, ``requires_grad=False``;
* ``old``: its parameters set back to ``requires_grad=True``, as ``activate_adapter`` left them before
  the fix: backward then also computes (and accumulates, since no optimizer zeroes them) the
  language adapter's weight gradients, and back-propagates below the lowest task adapter, through
  layer 0's attention down to the invertible adapter on the embeddings.

The switch happens in ``train_loop``'s ``after_step`` hook, outside the timed spans. Before the run,
one forward + backward per behaviour goes through ``torch.utils.flop_counter.FlopCounterMode``: the
matmul work each does, which no other load on the machine changes. Prints the machine, then a
Markdown table: median (min-max) wall and CPU seconds per step, the counted GFLOP, the old/fixed
ratios, and how many language-adapter tensors held a gradient after each kind of step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import SHAPES, SPECIALS, build_model_dir, machine_line, others_busy  # noqa: E402  (also puts ROOT on sys.path)

from xlpeft.compose import activate  # noqa: E402
from xlpeft.config import TrainConfig  # noqa: E402
from xlpeft.io import Manifest, load_module, save_module  # noqa: E402
from xlpeft.methods.adapters import AdapterConfig, AdapterModule, prepare_adapter  # noqa: E402
from xlpeft.methods.heads import build_head  # noqa: E402
from xlpeft.models import load_base  # noqa: E402
from xlpeft.training import (
    task_loss,  # noqa: E402
    train_loop,  # noqa: E402
)

PATTERN = ("fixed", "old", "old", "fixed")
NUM_LABELS = 9  # CoNLL/WikiANN-style BIO tags


def language_module(base, out: Path):
    """A saved MAD-X language adapter with random (non-identity) weights."""
    config = AdapterConfig()
    module = AdapterModule(config, base.hidden_size, len(base.layers))
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    manifest = Manifest(kind="language", method="adapter", lang="en", config=asdict(config),
                        base={"name": base.name, "fingerprint": base.fingerprint, "model_type": "bert"})
    return load_module(save_module(out, manifest, {"adapter": module.state_dict()}))


def batches(n: int, batch: int, seq: int, vocab: int):
    """``[CLS] random ids [SEP]`` with random labels (-100 on the specials), seed 0; cycled."""
    g = torch.Generator().manual_seed(0)
    cls, sep = SPECIALS["bert"]["cls"][0], SPECIALS["bert"]["sep"][0]
    ids = torch.randint(1000, vocab, (n, batch, seq), generator=g)
    ids[..., 0], ids[..., -1] = cls, sep
    labels = torch.randint(0, NUM_LABELS, ids.shape, generator=g)
    labels[..., 0] = labels[..., -1] = -100
    step = 0
    while True:
        yield {"input_ids": ids[step % n], "attention_mask": torch.ones_like(ids[step % n]),
               "labels": labels[step % n]}
        step += 1


def counted_gflop(loss_fn, batch, lang: list[torch.nn.Parameter], params: list[torch.nn.Parameter], old: bool) -> float:
    """Matmul GFLOP of one forward + backward (``FlopCounterMode``): the work, whatever else loads the machine."""
    from torch.utils.flop_counter import FlopCounterMode

    for p in lang:
        p.requires_grad_(old)
    with FlopCounterMode(display=False) as counter:
        loss_fn(batch).backward()
    for p in lang + params:
        p.grad = None
    return counter.get_total_flops() / 1e9


def run(args, workdir: Path) -> dict[str, dict[str, list[float]]]:
    base = load_base(str(build_model_dir(SHAPES["mbert"], workdir / "mbert")), device=torch.device(args.device))
    active = activate(base, [language_module(base, workdir / "lang-en")])
    lang = list(active.modules()[0].parameters())
    total = 2 * (args.warmup + args.steps)
    cfg = TrainConfig(lr=1e-4, max_steps=total, batch_size=args.batch, max_seq_len=args.seq, log_every=10**6,
                      device=args.device, precision="fp32")
    torch.manual_seed(cfg.seed)
    trainable = prepare_adapter(base, AdapterConfig(**AdapterConfig.defaults_for("task")), cfg)
    head = build_head("token_classification", base.hidden_size, NUM_LABELS).to(base.model.device)
    params = trainable.begin_phase(trainable.phases[0]) + list(head.parameters())
    base.model.train()
    head.train()
    result = {mode: {"wall": [], "cpu": [], "lang_grads": []} for mode in ("fixed", "old")}
    data = batches(4, args.batch, args.seq, SHAPES["mbert"].vocab)

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return task_loss(base, head, {k: v.to(base.model.device) for k, v in batch.items()})
    clock: list[tuple[float, float]] = []

    def set_mode(step: int) -> None:  # step: 0-based index of the step about to run
        old = PATTERN[step % len(PATTERN)] == "old"
        for p in lang:
            p.requires_grad_(old)
            if not old:
                p.grad = None  # the fixed behaviour holds no gradient for the language adapter

    def sync() -> None:
        if base.model.device.type == "cuda":
            torch.cuda.synchronize()

    def after_step(step: int) -> None:  # step: 1-based, just finished
        sync()
        wall, cpu = time.perf_counter() - clock[-1][0], time.process_time() - clock[-1][1]
        mode = PATTERN[(step - 1) % len(PATTERN)]
        if step > 2 * args.warmup:
            result[mode]["wall"].append(wall)
            result[mode]["cpu"].append(cpu)
            result[mode]["lang_grads"].append(sum(p.grad is not None for p in lang))
        print(f"step {step:3d} {mode:5s} {wall:7.3f} s", flush=True)
        if step < total:
            set_mode(step)
        clock.append((time.perf_counter(), time.process_time()))

    result["fixed"]["gflop"], result["old"]["gflop"] = (counted_gflop(loss_fn, next(data), lang, params, old)
                                                        for old in (False, True))
    set_mode(0)
    sync()
    clock.append((time.perf_counter(), time.process_time()))
    train_loop(params, data, loss_fn, cfg, total, lambda *_: None, after_step=after_step, progress=False)
    trainable.close()
    active.remove()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per behaviour")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per behaviour")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine_line(args.device)}; torch {torch.__version__}")
    busy_before = others_busy()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    seconds = time.perf_counter() - start
    print(f"\nCPU busy (whole machine, 1 s sample) before: {busy_before:.0%}, after: {others_busy():.0%}; "
          f"total {seconds:.0f} s; batch {args.batch} x {args.seq}, {args.warmup} warm-up + {args.steps} timed "
          "steps per behaviour\n")
    med = {m: (statistics.median(r["wall"]), statistics.median(r["cpu"])) for m, r in result.items()}
    print("| language adapter during task training | s/step (median, min-max) | old/fixed | CPU s/step | old/fixed "
          "| GFLOP/step (counted) | old/fixed | lang. tensors with .grad after a step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, label in (("old", "old: requires_grad=True"), ("fixed", "fixed: frozen")):
        r, f = result[mode], result["fixed"]
        print(f"| {label} | {med[mode][0]:.2f} ({min(r['wall']):.2f}-{max(r['wall']):.2f}) | "
              f"{med[mode][0] / med['fixed'][0]:.2f}x | {med[mode][1]:.2f} | {med[mode][1] / med['fixed'][1]:.2f}x | "
              f"{r['gflop']:.1f} | {r['gflop'] / f['gflop']:.2f}x | {max(r['lang_grads'])} |")


if __name__ == "__main__":
    main()
