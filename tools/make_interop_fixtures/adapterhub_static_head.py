"""AdapterHub adapters saved from a *static-head* model, the common way (foreign venv, see README.md).

    benchmarks/.venv-adapterhub/bin/python tools/make_interop_fixtures/adapterhub_static_head.py tests/interop/fixtures

``BertForMaskedLM.from_pretrained(base)`` + ``adapters.init(model)`` + ``add_adapter`` +
``save_adapter(dir, name)``: with ``with_head=True`` (the default) AdapterHub also writes the static
model's whole MLM head (``cls.predictions.*``, the tied decoder included) with ``"config": null`` in
``head_config.json``. Two cases under ``adapterhub/``:

* ``static_head_seq_bn``: the adapter's weights drawn at random, the head untouched, so it equals
  the base's own; ``expected.safetensors`` holds the static model's logits with the adapter active;
* ``static_head_trained``: the same after two steps of AdamW on the parameters ``train_adapter``
  leaves trainable, which include the MLM head's transform: the saved head no longer equals the base's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import adapters
import torch
import transformers
from adapterhub_fixtures import logits, randomise
from adapters import SeqBnConfig
from safetensors.torch import save_file
from tiny_bases import input_batch
from transformers import BertForMaskedLM


def static_model(base_dir: Path, seed: int):
    model = BertForMaskedLM.from_pretrained(base_dir).eval()
    adapters.init(model)
    model.add_adapter("sw", config=SeqBnConfig(reduction_factor=4))
    randomise(model, "sw", seed)
    model.set_active_adapters("sw")
    return model


def main(fixtures: Path) -> None:
    transformers.logging.set_verbosity_error()
    base_dir = fixtures / "bases" / "tiny-bert"
    batch = input_batch("tiny-bert")

    model = static_model(base_dir, 11)
    target = fixtures / "adapterhub" / "static_head_seq_bn"
    model.save_adapter(str(target), "sw")
    save_file({**batch, "logits": logits(model, batch)}, str(target / "expected.safetensors"))

    model = static_model(base_dir, 12)
    model.train_adapter("sw")
    model.eval()  # dropout off; requires_grad stays as train_adapter set it
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.save_adapter(str(fixtures / "adapterhub" / "static_head_trained"), "sw")
    print(f"static-head AdapterHub fixtures written under {fixtures / 'adapterhub'} with adapters {adapters.__version__}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/interop/fixtures"))
