"""Inference cost of composed modules on an mBERT-base-shaped model: stacked adapters and summed deltas.

    .venv/bin/python benchmarks/sft_and_compose.py --model-dir DIR     # DIR: a model run.py built

Three measurements, each through xlpeft's own code (random weights; speed does not depend on them):

1. Stacked-adapter overhead: encoder forward (batch x seq tokens, eval mode, ``torch.inference_mode``)
   of the bare base, the base + a MAD-X language adapter (xlpeft's language defaults: Pfeiffer,
   reduction factor 2, NICE invertible adapter), and the base + language + task adapter (reduction
   factor 16, no invertible adapter) hooked by ``attach_adapters``: what a composed task model runs
   under its classification head.
2. Delta composition: two random :class:`~xlpeft.methods.sft.SparseDelta` of K = 7.6M (language)
   and 14.2M (task) entries, spread over the maskable weights in proportion to their size, added
   into the weights as ``compose`` does (``AppliedSFT``: checked, then ``index_add_`` on flat
   views), then removed again; the round trip's largest weight error is reported.
3. Merged-delta forward: the same forward with both deltas in the weights vs the bare base.

Configurations are timed in rotating order over ``--reps`` rounds; each number is a median.
Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xlpeft.methods.adapters import AdapterConfig, AdapterModule, attach_adapters  # noqa: E402
from xlpeft.methods.sft import AppliedSFT, SFTConfig, SparseDelta, maskable_parameters  # noqa: E402
from xlpeft.models import load_base  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, n: int = 1) -> float:
    """Median seconds of ``n`` calls of ``fn``."""
    times = []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_adapter(config: AdapterConfig, base, seed: int) -> AdapterModule:
    torch.manual_seed(seed)
    module = AdapterModule(config, base.hidden_size, len(base.layers))
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)  # not the identity at init: the numbers flow as in a trained adapter
    return module.to(next(base.model.parameters()).device).eval()


def random_delta(params: dict[str, torch.nn.Parameter], k: int, seed: int) -> SparseDelta:
    """K distinct entries, spread over ``params`` in proportion to their size (flat indices, sorted)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(p.numel() for p in params.values())
    entries, seen = {}, 0
    for name, p in params.items():
        k_p = round(k * (seen + p.numel()) / total) - round(k * seen / total)  # the k_p sum to exactly K
        seen += p.numel()
        if k_p:
            idx = torch.randperm(p.numel(), generator=g)[:k_p].sort().values
            entries[name] = (idx, torch.randn(k_p, generator=g) * 1e-3)
    return SparseDelta(entries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5, help="rounds of each configuration")
    ap.add_argument("--k-lang", type=int, default=7_600_000)
    ap.add_argument("--k-task", type=int, default=14_200_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    base = load_base(args.model_dir, device=device)
    model = base.model.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)  # (B, T)
    mask = torch.ones_like(ids)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward() -> None:
        with torch.inference_mode(), autocast:
            base.encoder(input_ids=ids, attention_mask=mask)

    blocks = [inference_overhead(base, forward, device, args), *composition(base, forward, device, args)]
    text = "\n\n".join(blocks)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")


def inference_overhead(base, forward, device, args) -> str:
    lang = random_adapter(AdapterConfig(), base, seed=1)  # MAD-X language adapter: rf 2 + invertible
    task = random_adapter(AdapterConfig(**AdapterConfig.defaults_for("task")), base, seed=2)  # rf 16
    setups = {"base": [], "base + language adapter": [lang], "base + language + task adapter": [lang, task]}
    forward()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in setups}
    names = list(setups)
    for r in range(args.reps):
        for name in names[r % 3:] + names[:r % 3]:  # rotate the order every round
            attachment = attach_adapters(base.model, base.arch, setups[name])
            times[name].append(timed(forward, device))
            attachment.remove()
    base_t = statistics.median(times["base"])
    tokens = args.batch * args.seq
    rows = []
    for name, module_list in setups.items():
        t = statistics.median(times[name])
        n_params = sum(p.numel() for m in module_list for p in m.parameters())
        rows.append(f"| {name} | {n_params:,} | {1000 * t:.0f} | {tokens / t:.0f} | {100 * (t / base_t - 1):+.1f}% |")
    return "\n".join([
        f"## Stacked-adapter inference overhead (encoder forward, {args.batch} x {args.seq} tokens, eval, "
        f"median of {args.reps})",
        "| setup | adapter params | ms / forward | tokens/s | overhead vs base |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ])


def composition(base, forward, device, args) -> list[str]:
    params = maskable_parameters(base, SFTConfig())
    lang = random_delta(params, args.k_lang, seed=1)
    task = random_delta(params, args.k_task, seed=2)
    before = {n: p.detach().clone() for n, p in params.items()}
    apply_t, revert_t, sum_t = [], [], []
    for _ in range(args.reps):
        sync(device)
        start = time.perf_counter()
        applied = [AppliedSFT(lang, base.model, False), AppliedSFT(task, base.model, False)]
        sync(device)
        apply_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        for a in reversed(applied):
            a.remove()
        sync(device)
        revert_t.append(time.perf_counter() - start)
        sum_t.append(timed(lambda: lang + task, torch.device("cpu")))
    error = max(float((p.detach() - before[n]).abs().max()) for n, p in params.items())
    del before

    forward()
    base_times, merged_times = [], []
    for r in range(args.reps):
        for merged in ((False, True) if r % 2 == 0 else (True, False)):
            applied = [AppliedSFT(lang, base.model, False), AppliedSFT(task, base.model, False)] if merged else []
            (merged_times if merged else base_times).append(timed(forward, device))
            for a in reversed(applied):
                a.remove()
    b, m = statistics.median(base_times), statistics.median(merged_times)
    n_maskable = sum(p.numel() for p in params.values())
    compose_block = "\n".join([
        f"## Delta composition on the mBERT-base shape ({n_maskable:,} maskable weights, median of {args.reps})",
        "| operation | entries | ms |",
        "|---|---:|---:|",
        f"| apply language (K={lang.num_params:,}) + task (K={task.num_params:,}) deltas into the weights "
        f"(2 x AppliedSFT: checks + index_add_) | {lang.num_params + task.num_params:,} | {1000 * statistics.median(apply_t):.0f} |",
        f"| remove both again (revert) | {lang.num_params + task.num_params:,} | {1000 * statistics.median(revert_t):.0f} |",
        f"| sum the two deltas as values (SparseDelta.__add__, CPU) | {(lang + task).num_params:,} | "
        f"{1000 * statistics.median(sum_t):.0f} |",
        f"\nround trip apply -> revert: largest weight change left {error:.2e} (float rounding)",
    ])
    forward_block = "\n".join([
        f"## Merged-delta forward (encoder forward, {args.batch} x {args.seq} tokens, eval, median of {args.reps})",
        "| model | ms / forward | vs base |",
        "|---|---:|---:|",
        f"| base | {1000 * b:.0f} | 1.00x |",
        f"| base + language + task deltas merged | {1000 * m:.0f} | {m / b:.2f}x |",
    ])
    return [compose_block, forward_block]


if __name__ == "__main__":
    main()
