"""Train the AdapterHub side of the training-equivalence fixtures with `adapters` 1.3.0 (foreign venv, see README.md).

    benchmarks/.venv-adapterhub/bin/python tools/make_interop_fixtures/adapterhub_training.py tests/interop/fixtures

Reads what ``adapterhub_training_init.py`` wrote (xlpeft's initial adapters exported to AdapterHub
format, the batches, the settings), trains with AdapterHub's own model and a plain explicit torch
loop (no HF Trainer) that mirrors ``xlpeft.training.train_loop``: AdamW (torch defaults: betas
0.9/0.999, eps 1e-8, decoupled weight decay on every trained tensor), a LambdaLR linear warm-up
``(s+1)/w`` then decay ``(S-s)/(S-w)``, ``clip_grad_norm_`` over the trained tensors, one
micro-batch per step. Dropout is off (``model.eval()`` after ``train_adapter``, which calls ``train()``).

* ``lang_seq_bn_inv``: ``BertAdapterModel`` with the base's MLM head as its flexible ``default``
  head; ``train_adapter("sw")``; the loss is the head's own masked-LM cross-entropy. AdapterHub
  leaves that head's transform (dense + LayerNorm) trainable after ``train_adapter`` (only
  ``base_model`` and the tied decoder are frozen); MAD-X language adapters, and xlpeft, keep the
  whole base with its MLM head frozen, so the head is frozen here explicitly and the run records it.
* ``lang_double_seq_bn``: the same with a Houlsby adapter (``double_seq_bn``, swish), no invertible adapter.
* ``task_ner_stack``: the AdapterHub-made ``adapterhub/seq_bn_inv`` language adapter loaded as
  ``sw``, xlpeft's initial task adapter + tagging head loaded as ``ner``; ``train_adapter("ner")``
  then ``active_adapters = Stack("sw", "ner")`` (the MAD-X recipe); the loss is the tagging
  head's own cross-entropy. ``train_adapter`` freezes ``sw`` (its invertible adapter included).

Writes ``final/`` (``save_adapter``, with the head for the task case) and ``run.json`` (per-step
losses, learning rates, the trained tensor names and the versions) next to the inputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import adapters
import torch
import transformers
from adapterhub_fixtures import flex_model
from adapters.composition import Stack
from safetensors.torch import load_file


def schedule(warmup: int, total: int):
    """xlpeft.training.linear_schedule, the same formula."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def train(model, batches: dict[str, torch.Tensor], cfg: dict) -> dict:
    """``cfg['max_steps']`` AdamW steps on the parameters that require grad; returns the run record."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg["weight_decay"])
    steps = cfg["max_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(int(cfg["warmup_ratio"] * steps), steps))
    losses, lrs = [], []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=batches["input_ids"][step], attention_mask=batches["attention_mask"][step],
                    labels=batches["labels"][step])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        losses.append(float(out.loss.detach()))
    return {"losses": losses, "lrs": lrs, "trained": [n for n, p in named if p.grad is not None],
            "requires_grad": [n for n, _ in named]}


def lang_case(fixtures: Path, case: Path, cfg: dict) -> dict:
    model = flex_model("tiny-bert", fixtures / "bases" / "tiny-bert")
    name = model.load_adapter(str(case / "initial"), load_as="sw")
    model.train_adapter(name)
    left_trainable = [n for n, p in model.heads.named_parameters() if p.requires_grad]
    for p in model.heads.parameters():  # see the module docstring: MAD-X keeps the MLM head frozen
        p.requires_grad_(False)
    model.eval()
    record = train(model, load_file(str(case / "batches.safetensors")), cfg)
    model.save_adapter(str(case / "final"), name, with_head=False)
    return {**record, "head_left_trainable_by_train_adapter": left_trainable}


def task_case(fixtures: Path, case: Path, cfg: dict) -> dict:
    model = flex_model("tiny-bert", fixtures / "bases" / "tiny-bert")
    model.delete_head("default")  # the MLM head plays no part in tagging
    lang = model.load_adapter(str(fixtures / "adapterhub" / "seq_bn_inv"), load_as="sw", with_head=False)
    task = model.load_adapter(str(case / "initial"), load_as="ner", with_head=True)
    model.train_adapter(task)
    model.active_adapters = Stack(lang, task)
    model.active_head = task
    model.eval()
    record = train(model, load_file(str(case / "batches.safetensors")), cfg)
    model.save_adapter(str(case / "final"), task, with_head=True)
    return record


def main(fixtures: Path) -> None:
    transformers.logging.set_verbosity_error()
    torch.use_deterministic_algorithms(True)
    root = fixtures / "adapterhub_training"
    for case_name, run in (("lang_seq_bn_inv", lang_case), ("task_ner_stack", task_case),
                           ("lang_double_seq_bn", lang_case)):
        case = root / case_name
        cfg = json.loads((case / "train.json").read_text(encoding="utf-8"))
        record = run(fixtures, case, cfg)
        record["versions"] = {"adapters": adapters.__version__, "transformers": transformers.__version__,
                              "torch": torch.__version__}
        (case / "run.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"{case_name}: {len(record['losses'])} steps, loss {record['losses'][0]:.4f} -> "
              f"{record['losses'][-1]:.4f}, trained {len(record['trained'])} tensors")
    print(f"AdapterHub training fixtures written under {root} with adapters {adapters.__version__}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/interop/fixtures"))
