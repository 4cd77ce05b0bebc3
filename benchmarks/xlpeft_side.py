"""xlpeft side of the benchmark: MAD-X language-adapter MLM training through xlpeft's own code paths.

Runs in the project venv; ``run.py`` starts it as a subprocess and times the whole process. One
step is what ``xlpeft train-lang --method adapter`` runs per step, by the same functions:

    base = load_base(dir)                                      # frozen, fingerprinted
    trainable = prepare_adapter(base, AdapterConfig(reduction_factor=16), cfg)   # hooks, Pfeiffer + NICE
    train_loop(trainable.begin_phase(...), batches, lambda b: mlm_loss(base, *b), cfg, ...)
        # zero_grad; mlm_loss (vocabulary logits at masked positions only); backward;
        # clip_grad_norm_(1.0); AdamW over the adapter parameters; LambdaLR

Per-step times come from ``train_loop``'s ``after_step`` hook; the optimizer ``train_loop`` builds
is observed with a global optimizer step hook (nothing in xlpeft is patched). On CUDA,
``train_loop`` itself runs the loss under bf16 autocast (``precision``) and uses a fused AdamW.
Writes a JSON result to ``--out``.
"""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers  # noqa: E402

from xlpeft.config import TrainConfig  # noqa: E402
from xlpeft.methods.adapters import AdapterConfig, prepare_adapter  # noqa: E402
from xlpeft.models import load_base  # noqa: E402
from xlpeft.training import mlm_loss, train_loop  # noqa: E402

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

    data = torch.load(args.data, weights_only=True)
    total = args.warmup + args.steps
    ids_all, labels_all = data["input_ids"], data["labels"]
    t0 = time.perf_counter()
    base = load_base(args.model_dir, device=device)
    cfg = TrainConfig(lr=args.lr, batch_size=ids_all.shape[1], max_steps=total, max_seq_len=ids_all.shape[2],
                      log_every=10**6, device=args.device, precision="bf16" if cuda else "fp32")
    torch.manual_seed(cfg.seed)
    trainable = prepare_adapter(base, AdapterConfig(reduction_factor=16), cfg)
    (phase,) = trainable.phases
    base.model.train()
    params = trainable.begin_phase(phase)
    t_loaded = time.perf_counter()

    optimizers: list[torch.optim.Optimizer] = []
    hook = register_optimizer_step_post_hook(
        lambda opt, *_: optimizers.append(opt) if not optimizers else None)
    losses: list[torch.Tensor] = []
    starts: list[tuple[float, float]] = []  # (wall clock, process CPU time) when a step begins
    ends: list[tuple[float, float]] = []  # ... and when it has ended
    gate = Gate(args.gate)

    def batches():
        for step in range(total):
            yield ids_all[step % len(ids_all)].to(device), labels_all[step % len(labels_all)].to(device)

    def loss_fn(batch) -> torch.Tensor:
        loss = mlm_loss(base, *batch)
        losses.append(loss.detach())
        return loss

    def after_step(step: int) -> None:
        if cuda:
            torch.cuda.synchronize(device)
        ends.append((time.perf_counter(), time.process_time()))
        gate.pass_turn()
        starts.append((time.perf_counter(), time.process_time()))

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    gate.pass_turn()  # ready
    starts.append((time.perf_counter(), time.process_time()))
    train_loop(params, batches(), loss_fn, cfg, total, lambda *_: None, after_step=after_step, desc="xlpeft")
    t_trained = time.perf_counter()  # includes the waits for turns under run.py
    hook.remove()

    trainable_ids = {id(p) for p in params}
    frozen = [p for p in base.model.parameters() if id(p) not in trainable_ids]
    result = {
        "side": "xlpeft",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in params),
        "frozen_params_with_grad": sum(p.grad is not None for p in frozen),
        "frozen_params_requiring_grad": sum(p.requires_grad for p in frozen),
        "optimizer_state_bytes": optimizer_state_bytes(optimizers[0]),
        "optimizer": type(optimizers[0]).__name__ + (" fused" if optimizers[0].defaults.get("fused") else ""),
        "step_seconds": [e[0] - s[0] for s, e in zip(starts[:-1], ends, strict=True)],
        "step_cpu_seconds": [e[1] - s[1] for s, e in zip(starts[:-1], ends, strict=True)],
        "losses": [float(x) for x in losses],
        "seconds": {"imports": T_IMPORTED - T_START, "load": t_loaded - t0, "train": t_trained - t_loaded},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
    trainable.close()
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
