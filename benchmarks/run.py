"""Speed and memory of xlpeft's MLM training against the AdapterHub ``adapters`` library, side by side.

    bash benchmarks/setup_adapterhub.sh          # once: adapters 1.3.0 in benchmarks/.venv-adapterhub
    .venv/bin/python benchmarks/run.py           # CPU, mBERT-base shape, ~6 min on 2 idle cores
    .venv/bin/python benchmarks/run.py --quick   # smoke run, a few minutes
    .venv/bin/python benchmarks/run.py --models mbert,xlmr --device cuda

What it does, in order (all on random-weight models of real shapes; nothing is downloaded):

1. Measures the machine's matmul peak: fp32 ``torch.mm`` of 2048^2 and 4096^2, median of 10, best size.
2. Per model shape (mBERT-base: vocabulary 119,547; XLM-R-base: 250,002; both 12 x 768, FFN 3072)
   builds ``*ForMaskedLM`` with seed 0, saves it once (safetensors + a word-level tokenizer with the
   real special-token ids), and draws the same token batches (seed 0, ``[CLS] random ids [SEP]``)
   masked once by xlpeft's ``mask_tokens`` (15%, 80/10/10). Both sides load that directory and file.
3. Runs the two sides as subprocesses that take turns step by step (A B, B A, ...): both load
   (one after the other), then only one works at a time while the other sleeps, so a slowdown of
   the shared machine hits both alike. ``adapterhub_side.py`` runs in the AdapterHub venv,
   ``xlpeft_side.py`` in this one; each does ``--warmup`` + ``--steps`` steps of MAD-X
   language-adapter training (Pfeiffer bottlenecks, reduction factor 16, NICE invertible adapter;
   AdamW, clipping 1.0). Steady step time is the median of the timed steps; whole-process time is
   the time each process held the machine from its start to its exit (imports, model load, all
   steps), without the waits for its turns; peak RSS is the child's ``ru_maxrss`` (``os.wait4``).
4. Runs ``sft_and_compose.py`` (stacked-adapter inference overhead, delta composition, merged-delta
   forward) and ``sft_memory.py`` (LT-SFT phase memory and selection time), each in a subprocess.
5. Prints Markdown tables.

Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

GiB = 2**30


@dataclass(frozen=True)
class Shape:
    """A real encoder's shape, for a random-weight model."""

    name: str
    kind: str  # bert | xlm-roberta
    vocab: int
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072


SHAPES = {
    "mbert": Shape("mBERT-base", "bert", 119_547),
    "xlmr": Shape("XLM-R-base", "xlm-roberta", 250_002),
}
# Special-token ids of the real tokenizers (mBERT: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103).
SPECIALS = {
    "bert": {"pad": (0, "[PAD]"), "unk": (100, "[UNK]"), "cls": (101, "[CLS]"), "sep": (102, "[SEP]"), "mask": (103, "[MASK]")},
    "xlm-roberta": {"cls": (0, "<s>"), "pad": (1, "<pad>"), "sep": (2, "</s>"), "unk": (3, "<unk>"), "mask": (250_001, "<mask>")},
}


# ---------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def machine_line(device: str) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    line = (f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
            f"{mem:.0f} GiB RAM, {platform.system()} {platform.release()}")
    if device == "cuda":
        line += f"; GPU {torch.cuda.get_device_name()}"
    return line


def matmul_peak(device: str, sizes: tuple[int, ...] = (2048, 4096), reps: int = 10) -> float:
    """Best median GFLOP/s of a square fp32 ``torch.mm`` (bf16 on CUDA, the precision training uses there)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        times = []
        for i in range(reps + 3):
            sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            if i >= 3:
                times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
        del a, b
    return best


def others_busy(seconds: float = 1.0) -> float:
    """Fraction of the machine's CPU time used over ``seconds`` while this process sleeps: other work."""
    def read() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except OSError:
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- model and data
def build_model_dir(shape: Shape, out: Path) -> Path:
    """Random-weight ``*ForMaskedLM`` of ``shape`` (seed 0) and a word-level tokenizer, saved to ``out``."""
    from tokenizers import Tokenizer, models
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        PreTrainedTokenizerFast,
        XLMRobertaConfig,
        XLMRobertaForMaskedLM,
    )
    from transformers.utils import logging as hf_logging

    specials = SPECIALS[shape.kind]
    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, intermediate_size=shape.ffn, pad_token_id=specials["pad"][0])
    torch.manual_seed(0)
    if shape.kind == "bert":
        model = BertForMaskedLM(BertConfig(**common))
    else:
        model = XLMRobertaForMaskedLM(XLMRobertaConfig(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                                                       bos_token_id=0, eos_token_id=2, **common))
    hf_logging.disable_progress_bar()
    model.save_pretrained(out)
    del model
    vocab = {f"tok{i}": i for i in range(shape.vocab)}
    for idx, text in specials.values():
        del vocab[f"tok{idx}"]
        vocab[text] = idx
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk"][1]))
    PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": t for k, (_, t) in specials.items()}).save_pretrained(out)
    gc.collect()
    return out


def build_data(shape: Shape, model_dir: Path, n_batches: int, batch: int, seq: int, out: Path) -> dict[str, float]:
    """``n_batches`` distinct batches ``[CLS] random ids [SEP]`` (seed 0), masked by xlpeft's ``mask_tokens``."""
    from transformers import AutoTokenizer

    from xlpeft.data.mlm import mask_tokens

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    n = n_batches * batch
    body = torch.randint(1000, shape.vocab - 1, (n, seq - 2), generator=g)  # (n, T-2), clear of special ids
    cls = torch.full((n, 1), tokenizer.cls_token_id)
    sep = torch.full((n, 1), tokenizer.sep_token_id)
    inputs, labels = mask_tokens(torch.cat([cls, body, sep], dim=1), tokenizer, 0.15, g)  # (n, T) each
    torch.save({"input_ids": inputs.view(n_batches, batch, seq), "labels": labels.view(n_batches, batch, seq)}, out)
    return {"masked_per_batch": float((labels != -100).sum()) / n_batches}


# ---------------------------------------------------------------- FLOPs
def step_flops(shape: Shape, batch: int, seq: int, head_positions: float, rf: float = 16, inv_rf: float = 2) -> float:
    """Matmul FLOPs one training step executes (forward + backward), frozen base, adapters trained.

    With N = B*T tokens, P positions sent through the MLM head (all N for AdapterHub, the masked
    ones for xlpeft), H hidden, I FFN, L layers, V vocabulary, r = H // rf, w = (H/2) // inv_rf:

        forward  = 2N*L*(4H^2 + 2HI)                    encoder linears
                 + 4N*T*H*L                             attention scores and mixing
                 + 2N*L*2Hr + 2N*2Hw                    adapters, invertible adapter on the embeddings
                 + 2P*(H^2 + 2Hw + HV)                  head transform, inverse adapter, decoder
        backward = 1x forward for frozen linears (input gradients only: no weight gradients),
                   2x for attention matmuls (both operands are activations),
                   2x for adapter matmuls (input and weight gradients).

    Element-wise work (softmax, GELU, LayerNorm, dropout, the loss) is not counted.
    """
    n, h, i_, layers, v = batch * seq, shape.hidden, shape.ffn, shape.layers, shape.vocab
    r, w = int(h // rf), int((h // 2) // inv_rf)
    frozen = 2 * n * layers * (4 * h * h + 2 * h * i_) + 2 * head_positions * (h * h + h * v)
    attention = 4 * n * seq * h * layers
    adapters = 2 * n * layers * 2 * h * r + 2 * n * 2 * h * w + 2 * head_positions * 2 * h * w
    return 2 * frozen + 3 * attention + 3 * adapters


# ---------------------------------------------------------------- running the sides
@dataclass
class Run:
    side: str
    wall: float  # seconds the process ran while holding the machine: start-up, load, its steps, exit
    max_rss: int  # bytes
    cpu: float  # CPU seconds of the whole process (user + system)
    result: dict


def run_child(cmd: list[str], log: Path) -> tuple[float, int]:
    """Run ``cmd`` to completion; (wall seconds, peak RSS bytes of that child). Raises on failure."""
    with log.open("w", encoding="utf-8") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"Error: {' '.join(map(str, cmd[:2]))} failed (exit {code}); log {log}:\n{tail}")
    return wall, usage.ru_maxrss * 1024


class Turns:
    """A side's process that works only in its turns: start-up until it is ready, then one step per turn.

    The child gets two pipe ends (``--gate R,W``): it writes a byte when it is ready or has finished a
    step, then blocks reading the next go. While one side works the other sleeps, holding its memory
    but no CPU, so the two sides alternate step by step and any slowdown of the machine lasting
    longer than a step hits both. ``active`` adds up the time from each go to the byte back (and
    from process start to ready, and from the last go to exit): the whole process without the
    waiting. A child with a varying amount of work (``methods.py``'s sides) writes ``f`` instead of
    ``d`` after its last unit: :meth:`turn` then returns False and only :meth:`finish` is left.
    """

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log_path = log
        self.log = log.open("w", encoding="utf-8")
        go_r, self.go_w = os.pipe()
        self.done_r, done_w = os.pipe()
        self.active = 0.0
        start = time.perf_counter()
        self.proc = subprocess.Popen([*cmd, "--gate", f"{go_r},{done_w}"], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, pass_fds=(go_r, done_w))
        os.close(go_r)
        os.close(done_w)
        self._wait(start)

    def turn(self) -> bool:
        """Let the child do one unit of work; False when it said that was its last one."""
        start = time.perf_counter()
        try:
            os.write(self.go_w, b"g")
        except BrokenPipeError:
            self._fail()
        return self._wait(start)

    def finish(self) -> tuple[int, float]:
        """Let the child write its result and exit; (peak RSS bytes, CPU seconds)."""
        start = time.perf_counter()
        try:
            os.write(self.go_w, b"g")
        except BrokenPipeError:
            pass
        os.close(self.go_w)
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.active += time.perf_counter() - start
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        os.close(self.done_r)
        self.log.close()
        if self.proc.returncode != 0:
            self._fail()
        return usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime

    def _wait(self, start: float) -> bool:
        byte = os.read(self.done_r, 1)
        if byte not in (b"d", b"f"):  # EOF: the child died
            self._fail()
        self.active += time.perf_counter() - start
        return byte == b"d"

    def _fail(self) -> None:
        code = self.proc.wait()
        self.log.close()
        tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"Error: {self.proc.args[1]} failed (exit {code}); log {self.log_path}:\n{tail}")


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def compare(shape: Shape, model_dir: Path, data: Path, args, work: Path, ah_python: str | None) -> dict[str, list[Run]]:
    """``--rounds`` runs of both sides, taking turns step by step (A B, B A, ...)."""
    sides = ["adapterhub", "xlpeft"] if ah_python else ["xlpeft"]
    pythons = {"adapterhub": ah_python, "xlpeft": sys.executable}
    runs: dict[str, list[Run]] = {s: [] for s in sides}
    for r in range(args.rounds):
        busy0, total0 = cpu_jiffies()
        own0, wall0 = time.process_time(), time.perf_counter()
        children, outs = {}, {}
        for side in sides if r % 2 == 0 else sides[::-1]:
            tag = f"{shape.name}-{side}-{r + 1}"
            outs[side] = work / f"{tag}.json"
            cmd = [pythons[side], str(HERE / f"{side}_side.py"), "--model-dir", str(model_dir), "--data", str(data),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device,
                   "--out", str(outs[side])]
            children[side] = Turns(cmd, work / f"{tag}.log")
        for step in range(args.warmup + args.steps):
            for side in sides if step % 2 == 0 else sides[::-1]:
                children[side].turn()
        finished = {side: child.finish() for side, child in children.items()}
        busy1, total1 = cpu_jiffies()
        ticks = os.sysconf("SC_CLK_TCK")
        children_cpu = sum(cpu for _, cpu in finished.values()) + time.process_time() - own0
        others = max(0.0, (busy1 - busy0) / ticks - children_cpu) / ((total1 - total0) / ticks)
        print(f"  round {r + 1}: {time.perf_counter() - wall0:.0f} s; CPU used by other processes meanwhile: "
              f"{100 * others:.0f}% of the machine", flush=True)
        for side, child in children.items():
            result = json.loads(outs[side].read_text(encoding="utf-8"))
            rss, cpu = finished[side]
            runs[side].append(Run(side, child.active, rss, cpu, result))
            timed = result["step_seconds"][args.warmup:]
            print(f"    {side:<10} whole process {child.active:6.1f} s   steady {statistics.median(timed):6.2f} s/step "
                  f"({statistics.median(result['step_cpu_seconds'][args.warmup:]):6.2f} CPU s)   "
                  f"peak RSS {rss / GiB:5.2f} GiB   loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}",
                  flush=True)
    return runs


# ---------------------------------------------------------------- tables
def markdown(columns: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(shape: Shape, runs: dict[str, list[Run]], args, masked: float, peak: float) -> dict[str, dict]:
    tokens = args.batch * args.seq
    out = {}
    for side, rs in runs.items():
        timed = [t for r in rs for t in r.result["step_seconds"][args.warmup:]]
        step = statistics.median(timed)
        cpu = statistics.median(t for r in rs for t in r.result["step_cpu_seconds"][args.warmup:])
        wall = statistics.median(r.wall for r in rs)
        positions = tokens if side == "adapterhub" else masked
        flops = step_flops(shape, args.batch, args.seq, positions)
        mem_key = "cuda_peak_bytes" if args.device == "cuda" else None
        memory = max((r.result[mem_key] for r in rs) if mem_key else (r.max_rss for r in rs))
        out[side] = {
            "step": step, "cpu": cpu, "step_spread": (min(timed), max(timed)), "tokens_per_s": tokens / step, "wall": wall,
            "wall_tokens_per_s": tokens * (args.warmup + args.steps) / wall, "memory": memory, "flops": flops,
            "peak_fraction": flops / step / (peak * 1e9), "first_loss": rs[0].result["losses"][0],
            "last_loss": rs[0].result["losses"][-1], "result": rs[0].result,
        }
    return out


def training_table(summaries: dict[str, dict[str, dict]], args) -> str:
    mem = "peak RSS GiB" if args.device == "cpu" else "peak CUDA alloc GiB"
    columns = ["model", "side", "s/step (median, min-max)", "tokens/s", "speed-up", "CPU s/step", "speed-up (CPU)",
               "whole process s", "tokens/s (whole)", "speed-up (whole)", mem, "GFLOP/step", "% of matmul peak",
               "loss first -> last"]
    rows = []
    for model, sides in summaries.items():
        ah = sides.get("adapterhub")
        for side, s in sides.items():
            up = f"{s['tokens_per_s'] / ah['tokens_per_s']:.2f}x" if ah else "-"
            up_wall = f"{s['wall_tokens_per_s'] / ah['wall_tokens_per_s']:.2f}x" if ah else "-"
            up_cpu = f"{ah['cpu'] / s['cpu']:.2f}x" if ah else "-"
            lo, hi = s["step_spread"]
            rows.append([model, "AdapterHub adapters 1.3.0" if side == "adapterhub" else "xlpeft",
                         f"{s['step']:.2f} ({lo:.2f}-{hi:.2f})", f"{s['tokens_per_s']:.0f}", up, f"{s['cpu']:.2f}", up_cpu,
                         f"{s['wall']:.0f}",
                         f"{s['wall_tokens_per_s']:.0f}", up_wall, f"{s['memory'] / GiB:.2f}", f"{s['flops'] / 1e9:.0f}",
                         f"{100 * s['peak_fraction']:.0f}%", f"{s['first_loss']:.2f} -> {s['last_loss']:.2f}"])
    return markdown(columns, rows)


def frozen_table(summaries: dict[str, dict[str, dict]]) -> str:
    columns = ["model", "side", "trainable params", "frozen params with .grad after a step",
               "frozen params requiring grad", "optimizer state MiB"]
    rows = []
    for model, sides in summaries.items():
        for side, s in sides.items():
            r = s["result"]
            rows.append([model, side, f"{r['trainable_params']:,}", r["frozen_params_with_grad"],
                         r["frozen_params_requiring_grad"], f"{r['optimizer_state_bytes'] / 2**20:.1f}"])
    return markdown(columns, rows)


# ---------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 2 timed steps, seq 128, 1 round, "
                    "short extras")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 12; quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 2; quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="runs of both sides (default 1)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; quick 128)")
    ap.add_argument("--models", default="mbert", help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--adapterhub-python", default=str(HERE / ".venv-adapterhub" / "bin" / "python"),
                    help="python of the AdapterHub venv (made by setup_adapterhub.sh)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for every process (OMP_NUM_THREADS; default: torch's choice, one per core)")
    ap.add_argument("--skip-adapterhub", action="store_true", help="run the xlpeft side only")
    ap.add_argument("--skip-extras", action="store_true", help="skip sft_and_compose.py and sft_memory.py")
    ap.add_argument("--workdir", default=None, help="where models, data and logs go (default: a temp dir, removed)")
    args = ap.parse_args()
    defaults = {"steps": (12, 2), "warmup": (2, 1), "rounds": (1, 1), "seq": (256, 128)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    unknown = [m for m in args.models.split(",") if m not in SHAPES]
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {', '.join(SHAPES)}")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads should be >= 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # the children's
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no GPU")
    return args


def adapterhub_python(args) -> str | None:
    if args.skip_adapterhub:
        return None
    python = Path(args.adapterhub_python)
    if not python.exists():
        raise SystemExit(f"Error: no AdapterHub venv at {python}; run `bash benchmarks/setup_adapterhub.sh` "
                         "(or pass --skip-adapterhub)")
    return str(python)


def print_header(args, peak: float) -> None:
    import transformers

    print("# xlpeft vs AdapterHub: MAD-X language-adapter MLM training, side by side")
    print(f"machine: {machine_line(args.device)}")
    print(f"project venv: python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; AdapterHub venv: see the side's versions below")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"workload: batch {args.batch} x {args.seq} tokens, {args.warmup} warm-up + {args.steps} timed steps per run, "
          f"{args.rounds} round(s), the two sides taking turns step by step, device {args.device}"
          + (" (bf16 autocast; AdamW fused on the AdapterHub side)" if args.device == "cuda" else " (fp32)"))
    print("adapters: Pfeiffer bottleneck after each FFN, reduction factor 16, ReLU; NICE invertible adapter "
          "(reduction factor 2) on the embeddings, its inverse before the MLM decoder; base and MLM head frozen")
    print(f"matmul peak: {peak:.0f} GFLOP/s ({'bf16' if args.device == 'cuda' else 'fp32'} torch.mm, 2048^2 and 4096^2, "
          "median of 10, best size)")
    print(f"CPU used by other processes at start: {100 * others_busy():.0f}% of the machine (other work slows both "
          "sides; CPU s/step is less sensitive to it than wall time)")
    print(flush=True)


def main() -> None:
    args = parse_args()
    ah_python = adapterhub_python(args)
    started = time.perf_counter()
    peak = matmul_peak(args.device)
    print_header(args, peak)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="xlpeft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict[str, dict]] = {}
    versions: dict[str, dict] = {}
    model_dirs: dict[str, Path] = {}
    try:
        for key in args.models.split(","):
            shape = SHAPES[key]
            model_dir = work / key
            if not (model_dir / "model.safetensors").is_file():
                build_model_dir(shape, model_dir)
            model_dirs[key] = model_dir
            data = work / f"{key}-data.pt"
            stats = build_data(shape, model_dir, args.warmup + args.steps, args.batch, args.seq, data)
            print(f"## {shape.name} shape: vocabulary {shape.vocab:,}, {shape.layers} layers x {shape.hidden}; "
                  f"{stats['masked_per_batch']:.0f} masked positions per batch of {args.batch * args.seq} tokens",
                  flush=True)
            runs = compare(shape, model_dir, data, args, work, ah_python)
            summaries[shape.name] = summarise(shape, runs, args, stats["masked_per_batch"], peak)
            for side, rs in runs.items():
                versions[side] = rs[0].result["versions"]
            ah = runs.get("adapterhub")
            if ah:
                left = ah[0].result["left_trainable_by_train_adapter"]
                print(f"  note: train_adapter left {left['tensors']} head tensors ({left['params']:,} params) trainable; "
                      "frozen here so both sides train the same parameters", flush=True)
        extras = [] if args.skip_extras else run_extras(args, work, model_dirs.get("mbert"))
        peak_end = matmul_peak(args.device)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print("## Versions")
    for side, v in versions.items():
        print(f"- {side}: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    print(f"- matmul peak at start {peak:.0f} GFLOP/s, at end {peak_end:.0f} GFLOP/s (fractions below use the start)")
    print()
    print("## MLM training, MAD-X language adapter (tokens/s = batch x seq / median step time; whole process = "
          f"{args.warmup + args.steps} steps incl. start-up, model load)")
    print(training_table(summaries, args))
    print()
    print("GFLOP/step counts the matmuls each side executes (see step_flops in run.py): the vocabulary projection "
          "at every position for AdapterHub, at the masked positions for xlpeft; frozen weights cost forward + "
          "input-gradient only.")
    print()
    print("## No work for frozen weights (after the last step)")
    print(frozen_table(summaries))
    for block in extras:
        print()
        print(block)
    print()
    print(f"total {time.perf_counter() - started:.0f} s")


def run_extras(args, work: Path, mbert_dir: Path | None) -> list[str]:
    """Inference overhead / composition (sft_and_compose.py) and LT-SFT memory (sft_memory.py)."""
    blocks = []
    if mbert_dir is None:
        mbert_dir = build_model_dir(SHAPES["mbert"], work / "mbert")
    print("## extras: stacked-adapter inference, delta composition, merged-delta forward", flush=True)
    out = work / "extras.json"
    cmd = [sys.executable, str(HERE / "sft_and_compose.py"), "--model-dir", str(mbert_dir), "--batch", str(args.batch),
           "--seq", str(args.seq), "--device", args.device, "--markdown", str(out)]
    cmd += ["--reps", "2" if args.quick else "5"]
    wall, _ = run_child(cmd, work / "extras.log")
    blocks.append(out.read_text(encoding="utf-8").strip())
    print(f"  done in {wall:.0f} s", flush=True)
    sft = HERE / "sft_memory.py"
    if sft.is_file():
        print("## extras: LT-SFT phase memory (benchmarks/sft_memory.py)", flush=True)
        cmd = [sys.executable, str(sft), "--device", args.device, "--rows", "lt-sft,dynamic-rigl"]
        cmd += ["--steps", "3", "--seq", "64"] if args.quick else []
        log = work / "sft_memory.log"
        wall, _ = run_child(cmd, log)
        text = log.read_text(encoding="utf-8", errors="replace")
        table = [ln for ln in text.splitlines() if ln.startswith(("|", "mBERT", "maskable", "total"))]
        blocks.append("## LT-SFT phases (benchmarks/sft_memory.py, "
                      f"`{' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}`)\n" + "\n".join(table))
        print(f"  done in {wall:.0f} s", flush=True)
    return blocks


if __name__ == "__main__":
    main()
