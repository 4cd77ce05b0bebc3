"""LT-SFT training equivalence: xlpeft's own phases (SFTTrainable through run_phases and train_loop) against
composable-sft's trainer run on the same tiny BERT, batches and settings (fixtures made by
``tools/make_interop_fixtures/composable_sft_training.py`` in composable-sft's venv).

Same mask, same delta (<= 1e-5), and for the task case the same final head. The deviations xlpeft keeps as
options (no L1 in phase 1, keeping the phase-1 head, a tied decoder) are run too and must *not* match: the
fixtures pin them. composable-sft's L1 as released has no effect (see
``test_composable_sfts_l1_as_released_changes_nothing``); xlpeft's L1 is checked against its trainer with that
one defect undone.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.interop.conftest import FIXTURES, base_dir
from xlpeft.config import TrainConfig
from xlpeft.distributed import Dist
from xlpeft.methods.heads import TokenClassificationHead
from xlpeft.methods.sft import SFTConfig, SFTTrainable
from xlpeft.models import load_base
from xlpeft.tracking.lifecycle import NullTracker
from xlpeft.training import PhaseRun, mlm_loss, run_phases

ROOT = FIXTURES / "composable_sft_training"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((ROOT / "meta.json").read_text())


@pytest.fixture
def base(tmp_path):
    """tiny-bert with dropout off, as composable-sft ran it (a fresh copy per test: training changes it in place)."""
    src = tmp_path / "tiny-bert-nodrop"
    shutil.copytree(base_dir("tiny-bert"), src)
    config = json.loads((src / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (src / "config.json").write_text(json.dumps(config))
    return load_base(str(src))


class InOrder:
    """The fixed micro-batches, in order, cycling (composable-sft's sequential sampler, one epoch after another)."""

    def __init__(self, rows: dict[str, torch.Tensor], batch_size: int) -> None:
        self.rows, self.batch_size, self.i = rows, batch_size, 0
        self.n = len(next(iter(rows.values())))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.i * self.batch_size % self.n
        self.i += 1
        return {k: v[start:start + self.batch_size] for k, v in self.rows.items()}


def _train(base, case: dict, sft_cfg: SFTConfig, rows, loss_fn, extras: dict) -> SFTTrainable:
    cfg = TrainConfig(lr=case["lr"], batch_size=case["batch_size"], grad_accum=case["grad_accum"], warmup_ratio=0.0,
                      weight_decay=0.0, max_grad_norm=1.0, max_steps=1000, precision="fp32", device="cpu",
                      log_every=1000, checkpoint_every=0, seed=0)
    sft_cfg = sft_cfg.with_epochs(len(rows["input_ids"]), cfg)  # the task case is epoch-based, as the recipe
    trainable = SFTTrainable(base, sft_cfg, cfg)
    base.model.train()
    run = PhaseRun(trainable, extras, InOrder(rows, case["batch_size"]), {}, loss_fn, None, cfg, NullTracker(),
                   "equivalence", None, Dist())
    run_phases(run)
    return trainable


def _compare(trainable: SFTTrainable, expected: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """(same mask, max |delta difference|) against composable-sft's mask and delta."""
    delta = trainable.delta().entries
    names = {k.removeprefix("mask.") for k in expected if k.startswith("mask.") and len(expected[k])}
    if set(delta) != names:
        return False, float("inf")
    worst = 0.0
    for name in names:
        idx, vals = delta[name]
        if not torch.equal(torch.sort(idx).values, expected[f"mask.{name}"]):
            return False, float("inf")
        order = torch.argsort(idx)
        worst = max(worst, float((vals[order] - expected[f"delta.{name}"]).abs().max()))
    return True, worst


def _lang(base, meta, case_name: str, **override):
    case = meta[case_name]
    batches = load_file(str(ROOT / "batches.safetensors"))
    rows = {"input_ids": batches["lang_input_ids"], "labels": batches["lang_labels"]}
    cfg = SFTConfig(**{**SFTConfig.defaults_for("language"), "num_params": case["k"],
                       "full_steps": case["full_steps"], "sparse_steps": case["sparse_steps"], **override})
    trainable = _train(base, case, cfg, rows, lambda b: mlm_loss(base, b["input_ids"], b["labels"]), {})
    return trainable, load_file(str(ROOT / f"{case_name}.safetensors"))


def _matches(trainable, expected) -> tuple[bool, float]:
    same_mask, worst = _compare(trainable, expected)
    trainable.close()
    return same_mask and worst <= TOLERANCE, worst


def test_composable_sfts_l1_as_released_changes_nothing(meta):
    """Its trainer's theta0 copies keep an autograd edge to the weights (``zeros_like(p).copy_(p)`` outside no_grad),
    so d|p - theta0|/dp = 0: the released MLM recipe (L1 0.1 in both phases) trains exactly as without L1."""
    assert meta["lang_mlm"]["full_l1"] == meta["lang_mlm"]["sparse_l1"] == 0.1
    assert meta["lang_mlm"]["max_abs_change_from_l1"] == 0.0


def test_language_sft_same_mask_and_delta_as_composable_sft_as_released(base, meta):
    """The released MLM recipe as composable-sft computes it: decoder untied and frozen, gradient accumulation 2,
    magnitude selection, and (its L1 being inert) no L1: xlpeft with ``l1=0``."""
    trainable, expected = _lang(base, meta, "lang_mlm", l1=0.0)
    assert trainable.config.freeze_decoder  # a language default
    assert base.model.get_output_embeddings().weight is not base.model.get_input_embeddings().weight  # untied
    ok, worst = _matches(trainable, expected)
    assert ok, worst
    assert base.model.get_output_embeddings().weight is base.model.get_input_embeddings().weight  # tied again


def test_language_sft_defaults_same_mask_and_delta_as_composable_sft_with_effective_l1(base, meta):
    """xlpeft's defaults (L1 0.1 in both phases, l1 * sum|theta - theta0| / all parameters, once per step) against
    composable-sft's trainer with only its theta0 copies detached (``detach_originals`` in the fixture script)."""
    trainable, expected = _lang(base, meta, "lang_mlm_l1")
    assert trainable.config.l1 == 0.1 and trainable.config.l1_full_phase
    ok, worst = _matches(trainable, expected)
    assert ok, worst


@pytest.mark.slow
@pytest.mark.parametrize("case_name, override", [
    ("lang_mlm_l1", {"l1_full_phase": False}), ("lang_mlm_l1", {"l1": 0.0}), ("lang_mlm", {"l1": 0.0, "freeze_decoder": False}),
], ids=["no-l1-in-phase-1", "no-l1", "tied-decoder"])
def test_language_sft_deviations_do_not_match(base, meta, case_name, override):
    trainable, expected = _lang(base, meta, case_name, **override)
    ok, worst = _matches(trainable, expected)
    assert not ok, worst


def _task(base, meta, **override):
    case = meta["task_tokcls"]
    batches = load_file(str(ROOT / "batches.safetensors"))
    rows = {"input_ids": batches["task_input_ids"], "labels": batches["task_labels"]}
    rows["attention_mask"] = torch.ones_like(rows["input_ids"])
    head = TokenClassificationHead(base.hidden_size, meta["num_labels"], dropout=0.0)
    head.load_state_dict(load_file(str(ROOT / "initial.safetensors")))  # composable-sft's initial classifier

    def loss_fn(b):
        logits = head(base.encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1))

    cfg = SFTConfig(**{**SFTConfig.defaults_for("task"), "num_params": case["k"], "l1": case["sparse_l1"],
                       "full_epochs": case["full_epochs"], "sparse_epochs": case["sparse_epochs"], **override})
    trainable = _train(base, case, cfg, rows, loss_fn, {"head": head})
    return trainable, head, load_file(str(ROOT / "task_tokcls.safetensors"))


def test_task_sft_same_mask_delta_and_head_as_composable_sft(base, meta):
    """NER/POS recipe: 3 + 10 epochs, no L1, the head reset to its initial values before phase 2."""
    trainable, head, expected = _task(base, meta)
    assert [p.steps for p in trainable.phases] == [12, 40]  # 3 and 10 epochs of 16 examples in batches of 4
    assert meta["task_tokcls"]["global_steps"] == 40  # composable-sft's phase 2 (its trainer state is per phase)
    same_mask, worst = _compare(trainable, expected)
    trainable.close()
    assert same_mask and worst <= TOLERANCE, worst
    for k, v in head.state_dict().items():
        assert float((v - expected[f"head.{k}"]).abs().max()) <= TOLERANCE, k


@pytest.mark.slow
def test_task_sft_keeping_the_phase1_head_does_not_match(base, meta):
    trainable, head, expected = _task(base, meta, reset_head=False)
    same_mask, worst = _compare(trainable, expected)
    trainable.close()
    head_diff = max(float((v - expected[f"head.{k}"]).abs().max()) for k, v in head.state_dict().items())
    assert same_mask  # phase 1 is the same ...
    assert max(worst, head_diff) > 10 * TOLERANCE  # ... phase 2 starts from another head


def test_composable_sfts_own_file_converts_to_the_same_delta(meta, tmp_path):
    """The trainer's ``sft().save()`` output, read by xlpeft's converter: the entries it kept (|delta| > 1e-7) agree."""
    from xlpeft.interop.composable_sft import read_sft

    diffs, dense, _ = read_sft(ROOT / "lang_mlm")
    expected = load_file(str(ROOT / "lang_mlm.safetensors"))
    assert not dense  # the MLM head was frozen: no dense values
    for name, (_, idx, vals) in diffs.items():
        mask, delta = expected[f"mask.{name}"], expected[f"delta.{name}"]
        assert bool(torch.isin(idx, mask).all())
        at = torch.searchsorted(mask, idx)
        assert torch.allclose(vals, delta[at], atol=0, rtol=0)
