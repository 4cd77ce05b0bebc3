"""AdapterHub side of the benchmarks: language-module MLM training (and inference latency) with ``adapters`` 1.3.0.

Runs inside ``benchmarks/.venv-adapterhub`` (made by ``setup_adapterhub.sh``) and imports only
``adapters``, ``transformers`` and ``torch``; ``run.py`` starts it as a subprocess and times the
whole process. What one step does is what an AdapterHub user runs:

    model = AutoModelForMaskedLM.from_pretrained(dir); adapters.init(model)
    model.add_adapter("lang", config=SeqBnInvConfig(reduction_factor=16)); model.train_adapter("lang")
    loss = model(input_ids, attention_mask=..., labels=labels).loss   # logits at every position
    loss.backward(); clip_grad_norm_(1.0); AdamW.step(); LambdaLR.step()

``train_adapter`` leaves the MLM head's transform (dense + LayerNorm) trainable on a model made
by ``adapters.init``; it is frozen here so that both sides train exactly the same parameters
(the count is reported).

``--config-class`` / ``--config-kwargs`` (methods.py) pick another method's config (``LoRAConfig``,
``PrefixTuningConfig``, ...; default run.py's ``SeqBnInvConfig(reduction_factor=16)``). Prompt
tuning prepends ``prompt_length`` positions to the output, so its labels get as many -100 in
front. ``--latency-reps N``: after training, the forward of batch 0 in eval mode under
``torch.inference_mode`` with the MLM head swapped for ``nn.Identity`` on this model instance
(the encoder's work, as the xlpeft side times ``base.encoder``), N times each for the bare base
(no active adapter), the adapter active, and merged (``merge_adapter``, LoRA and (IA)³ only), one
forward per turn in rotating order, after one untimed forward each. Writes a JSON result to ``--out``.
"""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import adapters  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForMaskedLM  # noqa: E402

T_IMPORTED = time.perf_counter()


MERGEABLE = ("LoRAConfig", "IA3Config")
"""The configs ``merge_adapter`` can fold into the weights (AdapterHub's (IA)³ is a LoRA variant)."""


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", required=True, help="torch file with input_ids and labels, (S, B, T) each")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--config-class", default="SeqBnInvConfig", help="an adapters config class")
    ap.add_argument("--config-kwargs", default='{"reduction_factor": 16}', help="JSON keyword arguments of it")
    ap.add_argument("--latency-reps", type=int, default=0, help="after training: timed forwards per configuration")
    ap.add_argument("--out", required=True)
    ap.add_argument("--gate", default=None, help="R,W pipe fds for taking turns with run.py")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    transformers.logging.set_verbosity_error()

    data = torch.load(args.data, weights_only=True)
    t0 = time.perf_counter()
    model = AutoModelForMaskedLM.from_pretrained(args.model_dir)
    adapters.init(model)
    config = getattr(adapters, args.config_class)(**json.loads(args.config_kwargs))
    model.add_adapter("lang", config=config)
    model.train_adapter("lang")
    if not model.active_adapters:
        raise SystemExit(f"the adapter is not active after train_adapter: {model.active_adapters!r}")
    # every parameter of the module has its name ("lang") as a path component; the rest is the head's transform
    left_trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lang" not in n.split(".")]
    for n, p in model.named_parameters():
        if n in left_trainable:
            p.requires_grad_(False)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, **({"fused": True} if cuda else {}))
    total = args.warmup + args.steps
    warmup = int(0.06 * total)  # the schedule xlpeft's train_loop uses: linear warm-up, then linear decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    t_loaded = time.perf_counter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    ids_all, labels_all = data["input_ids"], data["labels"]
    prompt = config["prompt_length"] if args.config_class == "PromptTuningConfig" else 0  # output positions added
    latency_units = args.latency_reps * (3 if args.config_class in MERGEABLE else 2)
    step_seconds, step_cpu_seconds, losses = [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    gate = Gate(args.gate)
    gate.pass_turn()  # ready
    for step in range(total):
        ids = ids_all[step % len(ids_all)].to(device)  # (B, T)
        labels = labels_all[step % len(labels_all)].to(device)  # (B, T), -100 where nothing is predicted
        if prompt:
            labels = torch.cat([torch.full((labels.shape[0], prompt), -100, device=device), labels], 1)  # (B, P+T)
        if cuda:
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))  # a sync point, as in any loop that logs its loss
        if cuda:
            torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - start)
        step_cpu_seconds.append(time.process_time() - cpu_start)
        gate.pass_turn(last=step == total - 1 and not latency_units)
    t_trained = time.perf_counter()  # includes the waits for turns under run.py

    trainable_ids = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trainable_ids]
    saved = sum(p.numel() for n, p in model.named_parameters() if "lang" in n.split("."))
    result = {
        "side": "adapterhub", "config": {"class": args.config_class, **config.to_dict()}, "lr": args.lr,
        "saved_params": saved,
        "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "active_adapters": str(model.active_adapters),
        "trainable_params": sum(p.numel() for p in params),
        "left_trainable_by_train_adapter": {"tensors": len(left_trainable),
                                             "params": sum(p.numel() for n, p in model.named_parameters() if n in left_trainable)},
        "frozen_params_with_grad": sum(p.grad is not None for p in frozen),
        "frozen_params_requiring_grad": sum(p.requires_grad for p in frozen),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "step_seconds": step_seconds,
        "step_cpu_seconds": step_cpu_seconds,
        "losses": losses,
        "seconds": {"imports": T_IMPORTED - T_START, "load": t_loaded - t0, "train": t_trained - t_loaded},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
    if latency_units:
        result["latency"] = latency(model, ids_all[0].to(device), args, gate)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


def latency(model, ids: torch.Tensor, args, gate: Gate) -> dict:
    """Median ms of the forward of ``ids`` with the MLM head swapped for the identity, per configuration."""
    device = torch.device(args.device)
    mask = torch.ones_like(ids)
    head, model.cls = model.cls, torch.nn.Identity()  # this instance only: the encoder's forward, hooks included
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    names = ["base", "unmerged"] + (["merged"] if args.config_class in MERGEABLE else [])

    def setup(name: str) -> None:
        if name == "base":
            model.set_active_adapters(None)
        elif name == "unmerged":
            model.set_active_adapters("lang")
        else:
            model.set_active_adapters("lang")
            model.merge_adapter("lang")

    def forward() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            model(input_ids=ids, attention_mask=mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for name in names:  # warm-up, untimed
        setup(name)
        forward()
        if name == "merged":
            model.reset_adapter()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.latency_reps):
        for i, name in enumerate(names[r % len(names):] + names[:r % len(names)]):  # rotate the order every round
            setup(name)
            times[name].append(forward())
            if name == "merged":
                model.reset_adapter()
            gate.pass_turn(last=r * len(names) + i + 1 == args.latency_reps * len(names))
    model.cls = head
    return {n: {"ms": 1000 * statistics.median(t), "ms_all": [1000 * x for x in t]} for n, t in times.items()}


if __name__ == "__main__":
    main()
    sys.exit(0)
