"""Every method as a language module, side by side: xlpeft vs AdapterHub ``adapters`` 1.3.0 vs peft 0.21 (issue 18).

    .venv/bin/python benchmarks/methods.py --quick --threads 1   # harness check: tiny BERT, 1 + 2 steps, ~2 min
    .venv/bin/python benchmarks/methods.py --threads 1           # mBERT-base shape, batch 8 x 128, 3 + 5 steps
    # measured: --batch 4 --warmup 2 --steps 3 --latency-reps 3 took 14 min on the shared 2-core machine
    .venv/bin/python benchmarks/methods.py --methods lora,ia3 --sides xlpeft,peft

For each row of :data:`METHODS` (a method at its default size as a language module; the xlpeft
``--set`` overrides, the AdapterHub config and the peft config, None where a library lacks the
method) it measures, on a random-weight model of a real shape (nothing is downloaded, as in
``run.py``) and the same masked batches on every side:

* **trainable parameters** (what the optimizer updates) and the parameters of the saved module;
* **MLM training speed**: tokens/s of the median of the timed steps (after ``--warmup`` untimed
  ones), AdamW, clipping 1.0, dropout on; each side's ordinary loss: xlpeft's ``mlm_loss`` computes
  vocabulary logits at the masked positions only, AdapterHub and peft the model's own loss over
  logits at every position (the same difference ``run.py`` measures for MAD-X);
* **peak memory**: the side process's peak RSS (``os.wait4``), model load and training included;
* **inference latency** of the applied module: the encoder forward of one fixed batch in eval mode
  (``torch.inference_mode``; the MLM head is not run), median of ``--latency-reps``, for the bare
  base, the module unmerged (hooks / wrapped layers) and merged into the weights where the library
  can merge it, each side timing its own base;
* **AdapterDrop** (xlpeft, Rücklé et al. 2021): the same forward for a Stack of a MAD-X language
  adapter (reduction factor 2 + NICE) and a task adapter (reduction factor 16) with the adapters of
  the lowest n layers dropped, n in ``--adapter-drop``, and the speed-up over n = 0.

The sides are subprocesses (``xlpeft_side.py``, ``adapterhub_side.py`` in ``benchmarks/.venv-adapterhub``,
``peft_side.py``) that take turns one unit at a time (a training step or a timed forward) through
``run.py``'s :class:`~run.Turns`, so a slowdown of the shared machine hits every side alike.
Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from run import (  # benchmarks/ is on sys.path when this file runs
    HERE,
    SHAPES,
    GiB,
    Shape,
    Turns,
    build_data,
    build_model_dir,
    cpu_jiffies,
    machine_line,
    markdown,
    others_busy,
)

TINY = Shape("tiny BERT", "bert", 2_000, hidden=128, layers=4, heads=4, ffn=256)
"""The ``--quick`` shape: hidden 128 so that Compacter's bottleneck (128 / 32 = 4) divides by n = 4."""

IA3_PEFT_TARGETS = r".*\.attention\.self\.(key|value)$|.*\.layer\.\d+\.output\.dense$"
IA3_PEFT_FFN = r".*\.layer\.\d+\.output\.dense$"
"""Liu et al. 2022's three sites in peft's terms: keys, values, and the FFN output Linear as a feed-forward
module (peft scales its *input*, the intermediate activation). peft's own BERT default would also scale
``attention.output.dense``."""


@dataclass(frozen=True)
class MethodRow:
    """One method at its default size as a language module, on every side that has it.

    ``sets``: xlpeft ``--set`` overrides over the method's language defaults; ``per_phase``: fields set to
    the per-phase step count (warm-up + timed); ``adapterhub`` / ``peft``: (config class, keyword
    arguments), None where the library lacks the method; ``note``: where a library's default differs.
    """

    name: str
    method: str
    sets: dict = field(default_factory=dict)
    per_phase: tuple[str, ...] = ()
    adapterhub: tuple[str, dict] | None = None
    peft: tuple[str, dict] | None = None
    note: str = ""


METHODS: tuple[MethodRow, ...] = (
    MethodRow("adapter", "adapter", {},
              adapterhub=("SeqBnInvConfig", {"reduction_factor": 2}),
              note="MAD-X language adapter: Pfeiffer, reduction factor 2, relu, NICE invertible adapter (rf 2); "
                   "AdapterHub's SeqBnInvConfig defaults to rf 16, set to 2; peft has no bottleneck adapters"),
    MethodRow("sft", "sft", {}, per_phase=("full_steps", "sparse_steps"),
              note="LT-SFT: phase 1 full fine-tuning, then K = 7,667,712 entries (scaled to the model) trained "
                   "alone; the row's speed is phase 2's, its memory the whole process's (phase 1 dominates); "
                   "neither AdapterHub nor peft has it"),
    MethodRow("lora", "lora", {},
              adapterhub=("LoRAConfig", {"r": 8, "alpha": 16}),
              peft=("LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "lora_dropout": 0.0}),
              note="r 8, alpha 16 on query/value, dropout 0; AdapterHub's and peft's default alpha is 8, set to 16"),
    MethodRow("ia3", "ia3", {},
              adapterhub=("IA3Config", {}),
              peft=("IA3Config", {"target_modules": IA3_PEFT_TARGETS, "feedforward_modules": IA3_PEFT_FFN}),
              note="keys, values, FFN intermediate; AdapterHub scales intermediate.dense's output before the "
                   "activation (xlpeft and peft after it); peft's BERT default also scales attention.output.dense, "
                   "set to the three sites"),
    MethodRow("prefix", "prefix", {},
              adapterhub=("PrefixTuningConfig", {"prefix_length": 30, "bottleneck_size": 512}),
              peft=("PrefixTuningConfig", {"task_type": "FEATURE_EXTRACTION", "num_virtual_tokens": 30,
                                           "prefix_projection": True, "encoder_hidden_size": 512}),
              note="30 key/value prefixes per layer through a 512-wide MLP (trained through it, dropped at export); "
                   "peft's default has no MLP (prefix_projection=False), set to True"),
    MethodRow("prompt", "prefix", {"layers": "input"},
              adapterhub=("PromptTuningConfig", {"prompt_length": 30}),
              peft=("PromptTuningConfig", {"task_type": "FEATURE_EXTRACTION", "num_virtual_tokens": 30}),
              note="prompt tuning: 30 input-embedding prompts, no MLP (xlpeft prefix layers=input); AdapterHub's "
                   "default length is 10, set to 30"),
    MethodRow("compacter", "compacter", {},
              adapterhub=("CompacterConfig", {}),
              note="Houlsby placement, reduction factor 32, gelu, n = 4, rank 1, shared rule; peft has none"),
    MethodRow("parallel", "parallel", {},
              adapterhub=("ParBnConfig", {}),
              note="beside the FFN, reduction factor 2, relu, scaling 4; peft has none"),
    MethodRow("mam", "mam", {},
              adapterhub=("MAMConfig", {}),
              note="prefix 30 through an 800-wide MLP + FFN parallel adapter (rf 2, scaling 4); peft has none"),
)
SIDES = ("xlpeft", "adapterhub", "peft")
SIDE_NAMES = {"xlpeft": "xlpeft", "adapterhub": "AdapterHub 1.3.0", "peft": "peft 0.21.2"}


def row_lr(row: MethodRow) -> float:
    """xlpeft's learning rate for the row's language module (its recipe's default); every side uses it."""
    from xlpeft.recipes.common import resolve_configs

    return resolve_configs(row.method, "language", dict(row.sets))[1].lr


def side_command(side: str, row: MethodRow, args, model_dir: Path, data: Path, out: Path) -> list[str]:
    """The side's command line for ``row`` (the gate is added by :class:`~run.Turns`)."""
    per_phase = args.warmup + args.steps
    common = ["--model-dir", str(model_dir), "--data", str(data), "--warmup", str(args.warmup), "--steps",
              str(args.steps), "--device", args.device, "--lr", repr(row_lr(row)), "--latency-reps",
              str(args.latency_reps), "--out", str(out)]
    if side == "xlpeft":
        sets = {**row.sets, **{k: per_phase for k in row.per_phase}}
        return [sys.executable, str(HERE / "xlpeft_side.py"), *common, "--method", row.method, "--sets", json.dumps(sets)]
    cls, kwargs = getattr(row, side)
    python = args.adapterhub_python if side == "adapterhub" else sys.executable
    return [python, str(HERE / f"{side}_side.py"), *common, "--config-class", cls, "--config-kwargs", json.dumps(kwargs)]


def take_turns(children: dict[str, Turns]) -> None:
    """One unit per child per round, the order reversed every round, until every child said it is done."""
    pending, rnd = list(children), 0
    while pending:
        for side in list(pending) if rnd % 2 == 0 else pending[::-1]:
            if not children[side].turn():
                pending.remove(side)
        rnd += 1


def run_row(row: MethodRow, sides: list[str], args, model_dir: Path, data: Path, work: Path) -> dict[str, dict]:
    """Train ``row``'s language module on each of ``sides`` taking turns; the sides' results with RSS and CPU."""
    busy0, total0 = cpu_jiffies()
    own0, wall0 = time.process_time(), time.perf_counter()
    children, outs = {}, {}
    for side in sides:
        outs[side] = work / f"{row.name}-{side}.json"
        children[side] = Turns(side_command(side, row, args, model_dir, data, outs[side]), work / f"{row.name}-{side}.log")
    take_turns(children)
    finished = {side: child.finish() for side, child in children.items()}
    busy1, total1 = cpu_jiffies()
    ticks = os.sysconf("SC_CLK_TCK")
    children_cpu = sum(cpu for _, cpu in finished.values()) + time.process_time() - own0
    others = max(0.0, (busy1 - busy0) / ticks - children_cpu) / ((total1 - total0) / ticks)
    results = {}
    for side, child in children.items():
        result = json.loads(outs[side].read_text(encoding="utf-8"))
        rss, cpu = finished[side]
        result.update(max_rss=rss, cpu=cpu, whole=child.active)
        results[side] = result
    print(f"## {row.name}: {time.perf_counter() - wall0:.0f} s; CPU used by other processes meanwhile: "
          f"{100 * others:.0f}% of the machine", flush=True)
    for side, r in results.items():
        print(f"    {side:<10} {steady(r, args)['step']:6.2f} s/step  peak RSS {r['max_rss'] / GiB:5.2f} GiB  trainable "
              f"{r['trainable_params']:>11,}  loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}  "
              f"latency {latency_text(r)}", flush=True)
    for r in results.values():
        r["others_busy"] = others
    return results


def steady(result: dict, args) -> dict[str, float]:
    """Median, min and max of the timed steps (the last phase's), and the median CPU time per step."""
    timed = result["step_seconds"][args.warmup:]
    return {"step": statistics.median(timed), "lo": min(timed), "hi": max(timed),
            "cpu": statistics.median(result["step_cpu_seconds"][args.warmup:])}


def latency_text(result: dict) -> str:
    lat = result.get("latency") or {}
    return ", ".join(f"{name} {v['ms']:.0f} ms" for name, v in lat.items())


def overhead(result: dict, name: str) -> str:
    lat = result.get("latency") or {}
    if name not in lat:
        return "-"
    return f"{lat[name]['ms']:.0f} ({100 * (lat[name]['ms'] / lat['base']['ms'] - 1):+.0f}%)"


def results_table(rows: dict[str, dict[str, dict]], args) -> str:
    tokens = args.batch * args.seq
    mem = "peak RSS GiB" if args.device == "cpu" else "peak CUDA alloc GiB"
    columns = ["method", "side", "trainable params", "saved params", "s/step (median, min-max)", "tokens/s",
               "xlpeft speed-up", "CPU s/step", "xlpeft speed-up (CPU)", mem, "base fwd ms", "unmerged ms (vs base)",
               "merged ms (vs base)"]
    lines = []
    for name, sides in rows.items():
        ours = steady(sides["xlpeft"], args) if "xlpeft" in sides else None
        for side, r in sides.items():
            s = steady(r, args)
            memory = r["cuda_peak_bytes"] if args.device == "cuda" else r["max_rss"]
            lines.append([name, SIDE_NAMES[side], f"{r['trainable_params']:,}", f"{r['saved_params']:,}",
                          f"{s['step']:.2f} ({s['lo']:.2f}-{s['hi']:.2f})", f"{tokens / s['step']:.0f}",
                          "-" if side == "xlpeft" or ours is None else f"{s['step'] / ours['step']:.2f}x",
                          f"{s['cpu']:.2f}", "-" if side == "xlpeft" or ours is None else f"{s['cpu'] / ours['cpu']:.2f}x",
                          f"{memory / GiB:.2f}",
                          f"{r['latency']['base']['ms']:.0f}" if r.get("latency") else "-",
                          overhead(r, "unmerged"), overhead(r, "merged")])
    return markdown(columns, lines)


def choice_table(rows: dict[str, dict[str, dict]], args) -> str:
    """xlpeft's rows only, for choosing a method: size, training cost, inference cost over the bare base."""
    tokens = args.batch * args.seq
    columns = ["method", "trainable params", "saved params", "tokens/s", "CPU s/step", "peak RSS GiB",
               "inference vs base: unmerged", "merged"]
    lines = []
    for name, sides in rows.items():
        r = sides.get("xlpeft")
        if r is None:
            continue
        s, lat = steady(r, args), r.get("latency") or {}
        rel = {k: f"{lat[k]['ms'] / lat['base']['ms']:.2f}x" if k in lat else "-" for k in ("unmerged", "merged")}
        lines.append([name, f"{r['trainable_params']:,}", f"{r['saved_params']:,}", f"{tokens / s['step']:.0f}",
                      f"{s['cpu']:.2f}", f"{r['max_rss'] / GiB:.2f}", rel["unmerged"], rel["merged"]])
    return markdown(columns, lines)


def sft_phases_line(rows: dict[str, dict[str, dict]], args) -> str | None:
    r = rows.get("sft", {}).get("xlpeft")
    if r is None:
        return None
    tokens, parts = args.batch * args.seq, []
    for p in r["phases"]:
        timed = p["step_seconds"][args.warmup:]
        parts.append(f"{p['name']}: {p['trainable_params']:,} trainable, {statistics.median(timed):.2f} s/step "
                     f"({tokens / statistics.median(timed):.0f} tokens/s), end of phase {p['end_phase_seconds']:.1f} s")
    return "LT-SFT phases (xlpeft): " + "; ".join(parts)


def adapter_drop_table(result: dict, args) -> str:
    lat = result["latency"]
    zero = lat["drop 0"]["ms"] if "drop 0" in lat else None
    columns = ["setup", "ms / forward (median)", "speed-up vs drop 0", "vs bare base"]
    lines = [["bare base", f"{lat['base']['ms']:.0f}", "-", "1.00x"]]
    for n in result["adapter_drop"]:
        ms = lat[f"drop {n}"]["ms"]
        lines.append([f"language + task adapters, adapter_drop={n}", f"{ms:.0f}",
                      f"{zero / ms:.2f}x" if zero else "-", f"{ms / lat['base']['ms']:.2f}x"])
    return markdown(columns, lines)


def run_adapter_drop(args, model_dir: Path, data: Path, work: Path, layers: int) -> dict | None:
    drops = sorted({n for n in args.adapter_drop if 0 <= n <= layers} | {0})
    out = work / "adapterdrop.json"
    cmd = [sys.executable, str(HERE / "xlpeft_side.py"), "--model-dir", str(model_dir), "--data", str(data),
           "--device", args.device, "--latency-reps", str(args.latency_reps), "--adapter-drop",
           ",".join(map(str, drops)), "--out", str(out)]
    start = time.perf_counter()
    child = Turns(cmd, work / "adapterdrop.log")
    take_turns({"xlpeft": child})
    child.finish()
    result = json.loads(out.read_text(encoding="utf-8"))
    print(f"## AdapterDrop: {time.perf_counter() - start:.0f} s; {latency_text(result)}", flush=True)
    return result


# ---------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="harness check: tiny BERT, 1 warm-up + 2 timed steps, "
                    "2 timed forwards per configuration")
    ap.add_argument("--methods", default=",".join(r.name for r in METHODS), help="comma-separated rows of METHODS")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    ap.add_argument("--model", default="mbert", help=f"shape: {', '.join(SHAPES)} (--quick: tiny BERT)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per phase (default 5; quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 3; quick 1)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per batch (default 8; quick 4)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; quick 32)")
    ap.add_argument("--latency-reps", type=int, default=None, help="timed forwards per configuration (default 5; quick 2)")
    ap.add_argument("--adapter-drop", default=None, help="AdapterDrop n to time, comma-separated (default 0,3,6,12; "
                    "quick 0,2,4; those above the layer count are left out); empty: skip")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--adapterhub-python", default=str(HERE / ".venv-adapterhub" / "bin" / "python"),
                    help="python of the AdapterHub venv (made by setup_adapterhub.sh)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for every process (OMP_NUM_THREADS)")
    ap.add_argument("--workdir", default=None, help="where models, data and logs go (default: a temp dir, removed)")
    ap.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = ap.parse_args()
    quick = {"steps": (5, 2), "warmup": (3, 1), "batch": (8, 4), "seq": (128, 32), "latency_reps": (5, 2),
             "adapter_drop": ("0,3,6,12", "0,2,4")}
    for key, (full, small) in quick.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.quick else full)
    names = {r.name for r in METHODS}
    unknown = [m for m in args.methods.split(",") if m not in names] + [s for s in args.sides.split(",") if s not in SIDES]
    if unknown:
        ap.error(f"unknown --methods/--sides {unknown}; methods: {', '.join(sorted(names))}; sides: {', '.join(SIDES)}")
    if not args.quick and args.model not in SHAPES:
        ap.error(f"--model: unknown {args.model!r}; choose from {', '.join(SHAPES)}")
    try:
        args.adapter_drop = [int(n) for n in args.adapter_drop.split(",") if n.strip()]
    except ValueError:
        ap.error(f"--adapter-drop should be comma-separated whole numbers, got {args.adapter_drop!r}")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads should be >= 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # the children's
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no GPU")
    args.sides = [s for s in SIDES if s in args.sides.split(",")]
    if "adapterhub" in args.sides and not Path(args.adapterhub_python).exists():
        raise SystemExit(f"Error: no AdapterHub venv at {args.adapterhub_python}; run `bash benchmarks/setup_adapterhub.sh` "
                         "(or pass --sides xlpeft,peft)")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    shape = TINY if args.quick else SHAPES[args.model]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="xlpeft-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say("# Methods as language modules: xlpeft vs AdapterHub vs peft")
    say(f"machine: {machine_line(args.device)}; CPU used by other processes at start: {100 * others_busy():.0f}%")
    say(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    say(f"workload: {shape.name} shape (vocabulary {shape.vocab:,}, {shape.layers} x {shape.hidden}, random weights), "
        f"batch {args.batch} x {args.seq} tokens, {args.warmup} warm-up + {args.steps} timed steps per phase, "
        f"{args.latency_reps} timed forwards per latency configuration; sides take turns one unit at a time")
    rows: dict[str, dict[str, dict]] = {}
    drop = None
    try:
        model_dir = work / "model"
        if not (model_dir / "model.safetensors").is_file():
            build_model_dir(shape, model_dir)
        data = work / "data.pt"
        stats = build_data(shape, model_dir, args.warmup + args.steps, args.batch, args.seq, data)
        say(f"{stats['masked_per_batch']:.0f} masked positions per batch of {args.batch * args.seq} tokens")
        for row in METHODS:
            if row.name not in args.methods.split(","):
                continue
            sides = [s for s in args.sides if s == "xlpeft" or getattr(row, s) is not None]
            rows[row.name] = run_row(row, sides, args, model_dir, data, work)
        if args.adapter_drop and "xlpeft" in args.sides:
            drop = run_adapter_drop(args, model_dir, data, work, shape.layers)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    say()
    say("## Versions")
    seen = {}
    for sides in rows.values():
        for side, r in sides.items():
            seen.setdefault(side, r["versions"])
    for side, v in seen.items():
        threads = next(r[side]["threads"] for r in rows.values() if side in r)
        say(f"- {SIDE_NAMES[side]} side: python {'3.11' if side == 'adapterhub' else platform.python_version()}, "
            + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; torch threads {threads}")
    say()
    say(f"## Language modules at their default sizes (MLM training tokens/s = {args.batch} x {args.seq} / median "
        "step; latency = encoder forward of one batch, eval, median)")
    say(results_table(rows, args))
    say()
    say("## xlpeft's methods side by side (the rows above)")
    say(choice_table(rows, args))
    sft_line = sft_phases_line(rows, args)
    if sft_line:
        say()
        say(sft_line)
    say()
    say("Defaults per row (the same on every side; where a library's own default differs it is named):")
    for row in METHODS:
        if row.name in rows:
            say(f"- `{row.name}` (xlpeft `--method {row.method}`"
                + (f" `--set {' '.join(f'{k}={v}' for k, v in row.sets.items())}`" if row.sets else "")
                + f", lr {rows[row.name]['xlpeft']['lr'] if 'xlpeft' in rows[row.name] else row_lr(row):g}; "
                + (f"AdapterHub `{row.adapterhub[0]}({fmt_kwargs(row.adapterhub[1])})`" if row.adapterhub else
                   "AdapterHub: none") + "; "
                + (f"peft `{row.peft[0]}({fmt_kwargs(row.peft[1])})`" if row.peft else "peft: none")
                + f"): {row.note}")
    if drop is not None:
        say()
        say(f"## AdapterDrop at inference (xlpeft; encoder forward of one batch, eval, median of {args.latency_reps}; "
            f"language adapter {drop['module_params']['language']:,} params, task adapter "
            f"{drop['module_params']['task']:,})")
        say(adapter_drop_table(drop, args))
    say()
    busy = [r["others_busy"] for sides in rows.values() for r in sides.values()]
    if busy:
        say(f"CPU used by other processes during the rows: {100 * min(busy):.0f}-{100 * max(busy):.0f}% of the machine")
    say(f"total {time.perf_counter() - started:.0f} s")
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n", encoding="utf-8")


def fmt_kwargs(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


if __name__ == "__main__":
    main()
