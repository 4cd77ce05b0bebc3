"""xlpeft side of the benchmarks: language-module MLM training (and inference latency) through xlpeft's own code paths.

Runs in the project venv; ``run.py`` and ``methods.py`` start it as a subprocess and time the whole
process. One step is what ``xlpeft train-lang --method NAME`` runs per step, by the same functions:

    base = load_base(dir)                                          # frozen, fingerprinted
    method_cfg, cfg = resolve_configs(NAME, "language", sets)      # the recipe's defaults + --set
    trainable = get_method(NAME).prepare(base, method_cfg, cfg)    # hooks (or in-place weights)
    for phase in trainable.phases:                                 # one phase; LT-SFT two
        train_loop(trainable.begin_phase(phase), batches, lambda b: mlm_loss(base, *b), cfg, phase.steps, ...)
        # zero_grad; mlm_loss (vocabulary logits at masked positions only); backward;
        # clip_grad_norm_(1.0); AdamW over the module's parameters; LambdaLR; trainable.after_step
        trainable.end_phase(phase)

Without ``--method`` it trains run.py's MAD-X language adapter (``adapter`` with reduction factor 16
and the NICE invertible adapter). Per-step times come from ``train_loop``'s ``after_step`` hook; the
optimizer ``train_loop`` builds is observed with a global optimizer step hook (nothing in xlpeft is
patched). On CUDA, ``train_loop`` itself runs the loss under bf16 autocast and uses a fused AdamW.

``--latency-reps N`` (methods.py): after training, the module is exported and applied as a saved
module (``spec.apply``, as ``xlpeft compose`` does), and the encoder forward of one fixed batch
(eval mode, ``torch.inference_mode``) is timed N times for the bare base, the module unmerged
(hooks) and merged into the weights, where the method offers it (LoRA's ``merge``; deltas are always
merged), one forward per turn, the configurations in rotating order after one untimed
forward each.

``--adapter-drop 0,3,6,12`` (methods.py): instead of training, the latency of a stacked MAD-X
language adapter + task adapter composition (``compose.activate`` with ``adapter_drop=n``).

Writes a JSON result to ``--out``.
"""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers  # noqa: E402

from xlpeft.compose import Composition, ModuleRef, activate  # noqa: E402
from xlpeft.io import LoadedModule, Manifest  # noqa: E402
from xlpeft.models import load_base  # noqa: E402
from xlpeft.recipes.common import base_ref, resolve_configs, resolve_epochs  # noqa: E402
from xlpeft.registry import get_method  # noqa: E402
from xlpeft.training import mlm_loss, train_loop  # noqa: E402

T_IMPORTED = time.perf_counter()
RUN_PY_SETS = {"reduction_factor": 16}
"""run.py's MAD-X language adapter (Pfeiffer, reduction factor 16, NICE invertible adapter): ``adapter`` with these."""


class Gate:
    """Turn-taking with run.py (``--gate R,W``): say ready / unit done on W, then wait for the go on R.

    Without ``--gate`` the process runs freely. Waiting happens outside every timed span. The last
    unit of work is reported with ``f`` (methods.py's sides do a varying number of units).
    """

    def __init__(self, spec: str | None) -> None:
        self.r, self.w = (int(x) for x in spec.split(",")) if spec else (None, None)

    def pass_turn(self, last: bool = False) -> None:
        if self.r is None:
            return
        os.write(self.w, b"f" if last else b"d")
        if os.read(self.r, 1) != b"g":
            raise SystemExit("run.py went away")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", required=True, help="torch file with input_ids and labels, (S, B, T) each")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each phase")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per phase")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default=None, help="registered method (default: run.py's MAD-X adapter)")
    ap.add_argument("--sets", default="{}", help="JSON object of --set overrides for the method and TrainConfig")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's language default)")
    ap.add_argument("--latency-reps", type=int, default=0, help="after training: timed forwards per configuration")
    ap.add_argument("--adapter-drop", default=None, help="comma-separated n: latency of lang + task adapters with "
                    "AdapterDrop n (no training)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--gate", default=None, help="R,W pipe fds for taking turns with run.py")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    data = torch.load(args.data, weights_only=True)
    gate = Gate(args.gate)
    t0 = time.perf_counter()
    base = load_base(args.model_dir, device=device)
    if args.adapter_drop is not None:
        result = adapter_drop_latency(base, data, args, gate)
    else:
        result = train(base, data, args, gate, t0)
    result.update({
        "side": "xlpeft", "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    })
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


def train(base, data: dict, args, gate: Gate, t0: float) -> dict:
    """Train a language module phase by phase, one step per turn; then (``--latency-reps``) time its inference."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    ids_all, labels_all = data["input_ids"], data["labels"]
    method = args.method or "adapter"
    per_phase = args.warmup + args.steps
    sets = {**(RUN_PY_SETS if args.method is None else {}), **json.loads(args.sets)}
    train_sets = {"batch_size": ids_all.shape[1], "max_steps": per_phase, "max_seq_len": ids_all.shape[2],
                  "log_every": 10**6, "device": args.device, "precision": "bf16" if cuda else "fp32"}
    if args.lr is not None:
        train_sets["lr"] = args.lr
    method_cfg, cfg = resolve_configs(method, "language", {**train_sets, **sets})
    method_cfg = resolve_epochs(method, method_cfg, cfg, len(ids_all) * ids_all.shape[1])
    spec = get_method(method)
    torch.manual_seed(cfg.seed)
    trainable = spec.prepare(base, method_cfg, cfg)
    base.model.train()
    t_loaded = time.perf_counter()

    optimizers: list[torch.optim.Optimizer] = []
    hook = register_optimizer_step_post_hook(lambda opt, *_: optimizers.append(opt) if opt not in optimizers else None)
    losses: list[torch.Tensor] = []
    starts: list[tuple[float, float]] = []  # (wall clock, process CPU time) when a step begins
    ends: list[tuple[float, float]] = []  # ... and when it has ended
    counter = iter(range(10**9))
    total_steps = sum(p.steps for p in trainable.phases)
    latency_units = args.latency_reps * len(latency_configs(spec, method_cfg)) if args.latency_reps else 0

    def batches():
        while True:
            step = next(counter)
            yield ids_all[step % len(ids_all)].to(device), labels_all[step % len(labels_all)].to(device)

    def loss_fn(batch) -> torch.Tensor:
        loss = mlm_loss(base, *batch)
        losses.append(loss.detach())
        return loss

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        sync(device)
    gate.pass_turn()  # ready
    phases, done = [], 0
    for phase in trainable.phases:
        params = trainable.begin_phase(phase)
        first = len(ends)

        def after_step(step: int, phase=phase) -> None:
            nonlocal done
            trainable.after_step(phase, step)
            sync(device)
            ends.append((time.perf_counter(), time.process_time()))
            done += 1
            gate.pass_turn(last=done == total_steps and not latency_units)
            starts.append((time.perf_counter(), time.process_time()))

        starts.append((time.perf_counter(), time.process_time()))
        train_loop(params, batches(), loss_fn, cfg, phase.steps, lambda *_: None, after_step=after_step,
                   desc=f"xlpeft {method}", progress=False)
        starts.pop()  # the start recorded after the phase's last step
        end_start = time.perf_counter()
        metrics = trainable.end_phase(phase)
        steps = [(s, e) for s, e in zip(starts[first:], ends[first:], strict=True)]
        phases.append({
            "name": phase.name, "steps": phase.steps, "trainable_params": sum(p.numel() for p in params),
            "step_seconds": [e[0] - s[0] for s, e in steps], "step_cpu_seconds": [e[1] - s[1] for s, e in steps],
            "end_phase_seconds": time.perf_counter() - end_start, "metrics": metrics,
        })
    t_trained = time.perf_counter()  # includes the waits for turns under run.py
    hook.remove()

    trainable_ids = {id(p) for p in params}
    frozen = [p for p in base.model.parameters() if id(p) not in trainable_ids]
    result = {
        "method": method, "config": asdict(method_cfg), "lr": cfg.lr, "phases": phases,
        "trainable_params": max(p["trainable_params"] for p in phases),
        "frozen_params_with_grad": sum(p.grad is not None for p in frozen),
        "frozen_params_requiring_grad": sum(p.requires_grad for p in frozen),
        "optimizer_state_bytes": optimizer_state_bytes(optimizers[-1]),
        "optimizer": type(optimizers[-1]).__name__ + (" fused" if optimizers[-1].defaults.get("fused") else ""),
        # the last phase's steps: the module's own training (LT-SFT's sparse phase), as run.py reads them
        "step_seconds": phases[-1]["step_seconds"], "step_cpu_seconds": phases[-1]["step_cpu_seconds"],
        "losses": [float(x) for x in losses],
        "seconds": {"imports": T_IMPORTED - T_START, "load": t_loaded - t0, "train": t_trained - t_loaded},
    }
    tensors, extra = trainable.export()
    trainable.close()  # the base is restored exactly
    result["saved_params"] = int(extra.get("trainable_parameters",
                                           sum(t.numel() for s in tensors.values() for t in s.values())))
    if latency_units:
        module = loaded_module(base, method, "language", method_cfg, tensors, extra)
        result["latency"] = latency(base, data, args, gate, {
            name: [replace_config(module, over)] if over is not None else [] for name, over in
            latency_configs(spec, method_cfg).items()})
    return result


def latency_configs(spec, method_cfg) -> dict[str, dict | None]:
    """Configuration name -> config overrides of the saved module (None: the bare base).

    A config with a ``merge`` field (LoRA) is timed both ways; a ``sum`` method without one (an
    LT-SFT delta) is always in the weights; every other method runs by hooks.
    """
    if "merge" in asdict(method_cfg):
        return {"base": None, "unmerged": {"merge": False}, "merged": {"merge": True}}
    if spec.combine == "sum":
        return {"base": None, "merged": {}}
    return {"base": None, "unmerged": {}}


def loaded_module(base, method: str, kind: str, method_cfg, tensors: dict, extra: dict) -> LoadedModule:
    """A module as ``load_module`` would return it after saving, kept in memory."""
    manifest = Manifest(kind=kind, method=method, base=base_ref(base), config=asdict(method_cfg),
                        lang="xx" if kind == "language" else None, task="bench" if kind == "task" else None,
                        extra={k: v for k, v in extra.items() if k != "trainable_parameters"},
                        files=[f"{stem}.safetensors" for stem in tensors])
    return LoadedModule(manifest, {s: {k: v.detach().cpu() for k, v in t.items()} for s, t in tensors.items()},
                        Path(f"<in-memory {kind} {method}>"))


def replace_config(module: LoadedModule, over: dict) -> LoadedModule:
    return LoadedModule(replace(module.manifest, config={**module.manifest.config, **over}), module.tensors, module.path)


def latency(base, data: dict, args, gate: Gate, setups: dict[str, list[LoadedModule]], adapter_drop: dict | None = None,
            ) -> dict:
    """Median ms of the encoder forward of batch 0 per setup (modules applied bottom first), one forward per turn."""
    device = torch.device(args.device)
    ids = data["input_ids"][0].to(device)  # (B, T)
    mask = torch.ones_like(ids)
    model = base.model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            base.encoder(input_ids=ids, attention_mask=mask)
        sync(device)
        return time.perf_counter() - start

    def run(name: str) -> float:
        active = None
        if setups[name]:
            composition = Composition.of([ModuleRef.of(m) for m in setups[name]], base.fingerprint)
            if adapter_drop:
                composition = replace(composition, adapter_drop=adapter_drop[name])
            active = activate(base, composition)
            for m in active.modules():
                m.to(device).eval()
        try:
            return forward()
        finally:
            if active is not None:
                active.remove()

    names = list(setups)
    for name in names:
        run(name)  # warm-up, untimed
    times: dict[str, list[float]] = {n: [] for n in names}
    units = args.latency_reps * len(names)
    for r in range(args.latency_reps):
        for i, name in enumerate(names[r % len(names):] + names[:r % len(names)]):  # rotate the order every round
            times[name].append(run(name))
            gate.pass_turn(last=r * len(names) + i + 1 == units)
    model.train()
    return {n: {"ms": 1000 * statistics.median(t), "ms_all": [1000 * x for x in t]} for n, t in times.items()}


def random_module(base, method: str, kind: str, seed: int) -> LoadedModule:
    """A module of ``method`` with its recipe's defaults for ``kind`` and random N(0, 0.02) weights (not the identity)."""
    method_cfg, cfg = resolve_configs(method, kind, {"device": "cpu"})
    torch.manual_seed(seed)
    trainable = get_method(method).prepare(base, method_cfg, cfg)
    params = trainable.begin_phase(trainable.phases[0])
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)
    tensors, extra = trainable.export()
    trainable.close()
    return loaded_module(base, method, kind, method_cfg, tensors, extra)


def adapter_drop_latency(base, data: dict, args, gate: Gate) -> dict:
    """Latency of a MAD-X language adapter + task adapter Stack with AdapterDrop n, and of the bare base."""
    drops = [int(n) for n in args.adapter_drop.split(",")]
    lang = random_module(base, "adapter", "language", seed=1)  # reduction factor 2 + NICE invertible adapter
    task = random_module(base, "adapter", "task", seed=2)  # reduction factor 16
    setups = {"base": [], **{f"drop {n}": [lang, task] for n in drops}}
    gate.pass_turn()  # ready
    out = latency(base, data, args, gate, setups, adapter_drop={f"drop {n}": n for n in drops})
    params = {name: sum(t.numel() for s in m.tensors.values() for t in s.values()) for name, m in
              (("language", lang), ("task", task))}
    return {"adapter_drop": drops, "latency": out, "module_params": params, "layers": len(base.layers),
            "configs": {"language": lang.manifest.config, "task": task.manifest.config}}


if __name__ == "__main__":
    main()
