"""xlpeft's training loop and AdapterHub 1.3.0's reach the same adapter weights from the same start (issue 14).

The fixtures (``tests/interop/fixtures/adapterhub_training/``, see its README section) hold xlpeft's
initial adapters exported to AdapterHub format, the batches (MLM masks included), the AdamW settings,
and what 8 steps of AdapterHub training made of them (``final/``, written by ``save_adapter``). Here
xlpeft trains from the same start with its own code path, ``train_loop`` over the method's
``prepare_adapter`` trainable with ``mlm_loss`` / ``task_loss``, and every final tensor is compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import xlpeft
from tests.interop.conftest import FIXTURES, base_dir
from xlpeft.compose import activate
from xlpeft.config import TrainConfig, build
from xlpeft.interop import convert
from xlpeft.io import load_module
from xlpeft.methods.adapters import AdapterConfig, prepare_adapter
from xlpeft.methods.heads import build_head
from xlpeft.training import mlm_loss, task_loss, train_loop

CASES = FIXTURES / "adapterhub_training"
TOLERANCE = 1e-5


def _imported(tmp_path: Path, src: Path, name: str):
    """An AdapterHub directory read by xlpeft's importer (the names and checks every user's conversion goes through)."""
    return load_module(convert(src, tmp_path / name, "adapterhub", base=base_dir("tiny-bert")))


def _train(base, case: str, tmp_path: Path, head=None) -> tuple[dict, list[float]]:
    """Train xlpeft's adapter (and ``head``) from the case's initial weights on its batches; (final state, losses)."""
    initial = _imported(tmp_path, CASES / case / "initial", f"{case}-initial")
    cfg = TrainConfig(**json.loads((CASES / case / "train.json").read_text()))
    batches = load_file(str(CASES / case / "batches.safetensors"))  # (S, B, T) each
    trainable = prepare_adapter(base, build(AdapterConfig, initial.manifest.config), cfg)
    trainable.module.load_state_dict(initial.tensors["adapter"], strict=True)
    params = trainable.begin_phase(trainable.phases[0])
    if head is not None:
        head.load_state_dict(initial.tensors["head"], strict=True)
        params += list(head.parameters())

        def loss_fn(b):
            return task_loss(base, head, b)
    else:
        def loss_fn(b):
            return mlm_loss(base, b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
    steps = ({k: v[s] for k, v in batches.items()} for s in range(cfg.max_steps))
    losses: list[float] = []
    base.model.eval()  # dropout off on both sides
    try:
        train_loop(params, steps, loss_fn, cfg, cfg.max_steps, lambda m, step: losses.append(m["loss"]),
                   progress=False)
    finally:
        trainable.close()
    state = {f"adapter.{k}": v.detach() for k, v in trainable.module.state_dict().items()}
    if head is not None:
        state |= {f"head.{k}": v.detach() for k, v in head.state_dict().items()}
    return state, losses


def _compare(tmp_path: Path, case: str, ours: dict, losses: list[float]) -> None:
    final = _imported(tmp_path, CASES / case / "final", f"{case}-final")
    initial = _imported(tmp_path, CASES / case / "initial", f"{case}-start")
    theirs = {f"{stem}.{k}": v for stem, s in final.tensors.items() for k, v in s.items()}
    start = {f"{stem}.{k}": v for stem, s in initial.tensors.items() for k, v in s.items()}
    assert ours.keys() == theirs.keys()
    moved = max(float((theirs[k] - start[k]).abs().max()) for k in theirs)
    assert moved > 100 * TOLERANCE, f"training barely moved the weights ({moved:.2g}); the comparison would be empty"
    diffs = {k: float((ours[k] - theirs[k]).abs().max()) for k in theirs}
    worst = max(diffs, key=diffs.get)
    print(f"{case}: weights moved up to {moved:.3g}; max |xlpeft - AdapterHub| {diffs[worst]:.3g} ({worst})")
    assert diffs[worst] <= TOLERANCE, f"{case}: {worst} differs from AdapterHub's by {diffs[worst]:.3g}"
    run = json.loads((CASES / case / "run.json").read_text())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(run["losses"]), rtol=0, atol=TOLERANCE)


@pytest.fixture
def fixture_base():
    return xlpeft.load_base(base_dir("tiny-bert"))


@pytest.mark.parametrize("case, placement, non_linearity, invertible", [
    ("lang_seq_bn_inv", "pfeiffer", "relu", True),  # MAD-X: SeqBnInvConfig, rf 2
    ("lang_double_seq_bn", "houlsby", "swish", False),  # DoubleSeqBnConfig, xlpeft's default activation for houlsby
])
def test_language_adapter_training_matches_adapterhub(fixture_base, tmp_path, case, placement, non_linearity,
                                                      invertible):
    """(a) A language adapter trained by MLM for 8 steps, from xlpeft's initial weights."""
    config = _imported(tmp_path, CASES / case / "initial", "config").manifest.config
    assert (config["placement"], config["non_linearity"], config["invertible"]) == (placement, non_linearity, invertible)
    ours, losses = _train(fixture_base, case, tmp_path)
    assert any(k.startswith("adapter.invertible.") for k in ours) == invertible
    _compare(tmp_path, case, ours, losses)


def test_task_adapter_over_frozen_language_adapter_matches_adapterhub(fixture_base, tmp_path):
    """(b) Task adapter + tagging head over AdapterHub's seq_bn_inv language adapter: train_adapter("ner"), Stack(sw, ner)."""
    lang = _imported(tmp_path, FIXTURES / "adapterhub" / "seq_bn_inv", "lang")
    active = activate(fixture_base, [lang])
    lang_adapter = active.modules()[0]
    head = build_head("token_classification", fixture_base.hidden_size, 5, dropout=0.0)
    try:
        ours, losses = _train(fixture_base, "task_ner_stack", tmp_path, head)
    finally:
        active.remove()
    assert all(torch.equal(v, lang.tensors["adapter"][k]) and not v.requires_grad
               for k, v in lang_adapter.state_dict(keep_vars=True).items())
    _compare(tmp_path, "task_ner_stack", ours, losses)
    run = json.loads((CASES / "task_ner_stack" / "run.json").read_text())
    assert not [n for n in run["trained"] if ".sw." in n], "AdapterHub trained the language adapter too"
