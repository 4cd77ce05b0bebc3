"""Starting point of the AdapterHub training-equivalence fixtures (run with the *project* venv, see README.md).

    .venv/bin/python tools/make_interop_fixtures/adapterhub_training_init.py tests/interop/fixtures

Writes ``adapterhub_training/<case>/`` with, for each case:

* ``initial/``: xlpeft's freshly initialised adapter (down ~ N(0, 0.02), up = 0, as ``prepare_adapter``
  makes it), and for the task case its freshly initialised head, exported by xlpeft's own
  :func:`~xlpeft.interop.adapterhub.export_adapterhub` (``adapter_config.json`` + ``pytorch_adapter.bin``);
* ``batches.safetensors``: the micro-batches, one per optimizer step, stacked (S, B, T): MLM inputs
  masked by xlpeft's ``mask_tokens`` (80/10/10) with the attention mask of the uncorrupted block,
  or token-classification labels (-100 on [CLS], [SEP] and padding);
* ``train.json``: the optimisation settings both sides use (xlpeft's ``TrainConfig`` fields).

``adapterhub_training.py`` (foreign venv) then trains from these with AdapterHub and writes ``final/``.
Cases: ``lang_seq_bn_inv``, a MAD-X language adapter (Pfeiffer + NICE invertible adapter, rf 2) trained
by MLM; ``task_ner_stack``, a MAD-X task adapter (rf 16) + tagging head trained over the frozen
AdapterHub-made ``adapterhub/seq_bn_inv`` language adapter (``Stack(sw, ner)``); ``lang_double_seq_bn``,
a Houlsby adapter (rf 2) with xlpeft's default non-linearity for that placement (swish), trained by MLM.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

import xlpeft
from xlpeft.data.mlm import attention_mask_for, mask_tokens
from xlpeft.interop.adapterhub import export_adapterhub
from xlpeft.io import Manifest, save_module
from xlpeft.methods.adapters import AdapterConfig, AdapterModule
from xlpeft.methods.heads import build_head

STEPS, BATCH, LENGTH = 8, 4, 16
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
TRAIN = {"lr": 5e-3, "warmup_ratio": 0.25, "weight_decay": 0.01, "max_grad_norm": 1.0, "grad_accum": 1,
         "max_steps": STEPS, "batch_size": BATCH, "log_every": 1, "precision": "fp32", "device": "cpu"}
"""AdamW (betas 0.9/0.999, eps 1e-8: torch's defaults, as in xlpeft.training.train_loop), linear warm-up/decay."""


def blocks(gen: torch.Generator, pad_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, B, T) [CLS] w.. [SEP] blocks over the tiny vocabulary; the last row of every batch padded after ``pad_from``."""
    body = torch.randint(5, 120, (STEPS, BATCH, LENGTH), generator=gen)
    body[..., 0], body[..., -1] = 2, 3  # [CLS], [SEP] of tiny-bert
    body[:, -1, pad_from - 1] = 3
    body[:, -1, pad_from:] = 0  # [PAD]
    return body, attention_mask_for(body, 0)


def mlm_batches(base, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    clean, attention = blocks(gen, 11)
    masked = [mask_tokens(clean[s], base.tokenizer, 0.15, gen) for s in range(STEPS)]
    return {"input_ids": torch.stack([m[0] for m in masked]), "labels": torch.stack([m[1] for m in masked]),
            "attention_mask": attention}


def tagging_batches(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids, attention = blocks(gen, 9)
    labels = torch.randint(0, len(LABELS), ids.shape, generator=gen)
    labels[(ids == 2) | (ids == 3) | (ids == 0)] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def export_initial(base, out: Path, kind: str, config: AdapterConfig, head: torch.nn.Module | None) -> None:
    module = AdapterModule(config, base.hidden_size, len(base.layers))  # xlpeft's own initialisation
    tensors = {"adapter": module.state_dict()}
    extra = {}
    if head is not None:
        tensors["head"] = head.state_dict()
        extra = {"labels": LABELS, "head": "token_classification", "head_dropout": 0.0}
    manifest = Manifest(kind=kind, method="adapter", lang="sw" if kind == "language" else None,
                        task="ner" if kind == "task" else None, config=asdict(config), extra=extra,
                        base={"name": "tiny-bert", "fingerprint": base.fingerprint, "model_type": "bert"})
    with tempfile.TemporaryDirectory() as tmp:
        export_adapterhub(save_module(Path(tmp) / "m", manifest, tensors), out / "initial")


def main(fixtures: Path) -> None:
    base = xlpeft.load_base(str(fixtures / "bases" / "tiny-bert"))
    root = fixtures / "adapterhub_training"
    torch.manual_seed(0)
    lang = root / "lang_seq_bn_inv"
    export_initial(base, lang, "language", AdapterConfig(), None)
    save_file(mlm_batches(base, 1), str(lang / "batches.safetensors"))
    torch.manual_seed(1)
    task = root / "task_ner_stack"
    config = AdapterConfig(**AdapterConfig.defaults_for("task"))
    export_initial(base, task, "task", config, build_head("token_classification", base.hidden_size, len(LABELS), 0.0))
    save_file(tagging_batches(2), str(task / "batches.safetensors"))
    torch.manual_seed(3)
    houlsby = root / "lang_double_seq_bn"
    export_initial(base, houlsby, "language", AdapterConfig(placement="houlsby", invertible=False), None)
    save_file(mlm_batches(base, 4), str(houlsby / "batches.safetensors"))
    for case in (lang, task, houlsby):
        (case / "train.json").write_text(json.dumps(TRAIN, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"initial adapters, batches and settings written under {root}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/interop/fixtures"))
