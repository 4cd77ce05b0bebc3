"""AdapterHub side of the benchmark: MAD-X language-adapter MLM training with ``adapters`` 1.3.0.

Runs inside ``benchmarks/.venv-adapterhub`` (made by ``setup_adapterhub.sh``) and imports only
``adapters``, ``transformers`` and ``torch``; ``run.py`` starts it as a subprocess and times the
whole process. What one step does is what an AdapterHub user runs:

    model = AutoModelForMaskedLM.from_pretrained(dir); adapters.init(model)
    model.add_adapter("lang", config=SeqBnInvConfig(reduction_factor=16)); model.train_adapter("lang")
    loss = model(input_ids, attention_mask=..., labels=labels).loss   # logits at every position
    loss.backward(); clip_grad_norm_(1.0); AdamW.step(); LambdaLR.step()

``train_adapter`` leaves the MLM head's transform (dense + LayerNorm) trainable on a model made
by ``adapters.init``; it is frozen here so that both sides train exactly the same parameters
(the count is reported). Writes a JSON result to ``--out``.
"""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import adapters  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForMaskedLM  # noqa: E402

T_IMPORTED = time.perf_counter()


class Gate:
    """Turn-taking with run.py (``--gate R,W``): say ready / step done on W, then wait for the go on R.

    Without ``--gate`` the process runs freely. Waiting happens outside every timed span.
    """

    def __init__(self, spec: str | None) -> None:
        self.r, self.w = (int(x) for x in spec.split(",")) if spec else (None, None)

    def pass_turn(self) -> None:
        if self.r is None:
            return
        os.write(self.w, b"d")
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
    model.add_adapter("lang", config=adapters.SeqBnInvConfig(reduction_factor=16))
    model.train_adapter("lang")
    if not model.active_adapters:
        raise SystemExit(f"the adapter is not active after train_adapter: {model.active_adapters!r}")
    left_trainable = [n for n, p in model.named_parameters() if p.requires_grad and "adapters" not in n]
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
    step_seconds, step_cpu_seconds, losses = [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    gate = Gate(args.gate)
    gate.pass_turn()  # ready
    for step in range(total):
        ids = ids_all[step % len(ids_all)].to(device)  # (B, T)
        labels = labels_all[step % len(labels_all)].to(device)  # (B, T), -100 where nothing is predicted
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
        gate.pass_turn()
    t_trained = time.perf_counter()  # includes the waits for turns under run.py

    trainable_ids = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trainable_ids]
    result = {
        "side": "adapterhub",
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
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
    sys.exit(0)
