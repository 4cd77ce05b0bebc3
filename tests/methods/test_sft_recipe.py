"""LT-SFT's published recipe in xlpeft: per-kind defaults, epoch-based phases, L1 in phase 1, the untied frozen
decoder, the head reset before phase 2 and a resume across it (composable-sft's released scripts; see
tests/interop/test_composable_sft_training.py for the equivalence with its trainer)."""

from __future__ import annotations

import pytest
import torch

from xlpeft.config import TrainConfig
from xlpeft.distributed import Dist
from xlpeft.errors import ConfigError
from xlpeft.methods.heads import TokenClassificationHead
from xlpeft.methods.sft import SFTConfig, SFTTrainable, SparseDelta, apply_sft, split_steps
from xlpeft.recipes.common import resolve_configs, resolve_epochs
from xlpeft.tracking.lifecycle import NullTracker
from xlpeft.training import PhaseRun, mlm_loss, run_phases


# ---- defaults and their precedence
def test_published_defaults_per_kind():
    lang, lang_train = resolve_configs("sft", "language", {})
    assert (lang.reference_num_params, lang.l1, lang.l1_full_phase, lang.freeze_decoder) == (7_667_712, 0.1, True, True)
    assert (lang_train.lr, lang_train.warmup_ratio) == (5e-5, 0.0)
    task, task_train = resolve_configs("sft", "task", {})
    assert (task.reference_num_params, task.l1, task.full_epochs, task.sparse_epochs) == (14_155_776, 0.0, 3, 10)
    assert task.reset_head and not task.freeze_decoder and task_train.lr == 5e-5
    assert resolve_configs("sft", "task", {"lr": "1e-4", "l1": "0.2"})[0:2][1].lr == 1e-4  # --set wins
    assert resolve_configs("adapter", "language", {})[1].lr == 1e-4  # adapters keep MAD-X's rate


def test_explicit_max_steps_replaces_the_default_epochs_but_not_explicit_ones():
    cfg, train = resolve_configs("sft", "task", {"max_steps": "200"})
    assert (cfg.full_epochs, cfg.sparse_epochs) == (None, None)
    assert resolve_epochs("sft", cfg, train, 1000) == cfg  # nothing to convert: the 100 + 100 split of --max-steps
    cfg, train = resolve_configs("sft", "task", {"full_epochs": "2", "max_steps": "50"})
    converted = resolve_epochs("sft", cfg, train, 64)  # batch 8: 8 steps an epoch
    assert (converted.full_steps, converted.sparse_steps) == (16, None)
    assert split_steps(converted, train.max_steps) == (16, 34)  # the sparse phase gets the rest of --max-steps
    cfg, train = resolve_configs("sft", "task", {"full_steps": "5"})
    converted = resolve_epochs("sft", cfg, train, 64)
    assert (converted.full_steps, converted.sparse_steps) == (5, 80)  # explicit steps beat epochs; 10 epochs sparse


@pytest.mark.parametrize("n, batch, accum, expected", [(16, 4, 1, (12, 40)), (17, 4, 2, (6, 20)), (3, 8, 1, (3, 10))])
def test_epochs_count_steps_as_the_hf_trainer(n, batch, accum, expected):
    """One epoch = ceil(n / batch) // grad_accum optimizer steps, at least 1."""
    cfg = SFTConfig(full_epochs=3, sparse_epochs=10).with_epochs(n, TrainConfig(batch_size=batch, grad_accum=accum))
    assert (cfg.full_steps, cfg.sparse_steps) == expected
    assert SFTConfig(selection="random", full_epochs=3, sparse_epochs=10).with_epochs(n, TrainConfig()).full_steps is None


def test_unconverted_epochs_are_refused(base):
    with pytest.raises(ConfigError, match="converted to steps"):
        SFTTrainable(base, SFTConfig(full_epochs=3, sparse_epochs=10), TrainConfig())


# ---- L1 in phase 1
def test_phase1_l1_is_added_once_per_step(base):
    cfg = SFTConfig(num_params=50, l1=0.5, full_steps=1, sparse_steps=1)
    trainable = SFTTrainable(base, cfg, TrainConfig())
    params = trainable.begin_phase(trainable.phases[0])
    name, p = next((n, q) for n, q in trainable.params.items() if n.endswith("query.weight"))
    with torch.no_grad():
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.01)  # theta != theta0
    ids = torch.randint(5, len(base.tokenizer), (2, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    for _ in range(2):  # two micro-batches of one step
        mlm_loss(base, ids, labels).backward()
    with_l1 = p.grad.clone()
    for q in params:
        q.grad = None
    trainable._l1_due = set()  # as if L1 was already added this step
    for _ in range(2):
        mlm_loss(base, ids, labels).backward()
    sign = torch.sign(p.detach() - trainable._theta0[name])
    n_params = sum(q.numel() for q in base.model.parameters())
    torch.testing.assert_close(with_l1 - p.grad, 0.5 / n_params * sign, rtol=0, atol=1e-9)
    trainable.close()


# ---- the MLM decoder
def test_freeze_decoder_unties_for_training_and_reties_on_close(base):
    model = base.model
    emb, dec = model.get_input_embeddings(), model.get_output_embeddings()
    shared = dec.weight
    assert shared is emb.weight
    trainable = SFTTrainable(base, SFTConfig(num_params=50, freeze_decoder=True, full_steps=1, sparse_steps=1), TrainConfig())
    assert dec.weight is not emb.weight and not dec.weight.requires_grad and torch.equal(dec.weight, emb.weight)
    trainable.begin_phase(trainable.phases[0])
    with torch.no_grad():
        emb.weight.add_(1.0)  # training moves the embeddings: the decoder stays at the base's values
    assert not torch.equal(dec.weight, emb.weight)
    trainable.close()
    assert dec.weight is shared is emb.weight


class _Loaded:
    def __init__(self, delta: SparseDelta, freeze_decoder: bool | None) -> None:
        self.tensors = {"delta": delta.to_tensors()}
        self.path = "module"
        config = {} if freeze_decoder is None else {"freeze_decoder": freeze_decoder}
        self.manifest = type("M", (), {"config": config})()


@pytest.mark.parametrize("freeze_decoder", [True, False, None])
def test_activated_language_sft_keeps_its_decoder_as_in_training(base, freeze_decoder):
    """A module trained with freeze_decoder is applied with the decoder untied at the base's values; older modules
    (no such key) and freeze_decoder=false keep it tied. remove() restores the base bit-exactly, tied again."""
    model = base.model
    emb_name = next(n for n, q in model.named_parameters(remove_duplicate=False)  # its encoder name, as deltas use
                    if q is model.get_input_embeddings().weight and not n.startswith(base.arch.mlm_head + "."))
    before = {n: q.detach().clone() for n, q in model.named_parameters(remove_duplicate=False)}
    delta = SparseDelta({emb_name: (torch.arange(0, 64, 3), torch.full((22,), 0.5))})
    handle = apply_sft(base, _Loaded(delta, freeze_decoder))
    dec = model.get_output_embeddings()
    untied = dec.weight is not model.get_input_embeddings().weight
    assert untied == bool(freeze_decoder)
    changed = not torch.equal(dec.weight, before[emb_name])
    assert changed != bool(freeze_decoder)
    handle.remove()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for n, q in model.named_parameters(remove_duplicate=False):
        assert torch.equal(q, before[n]), n


# ---- the head reset before phase 2, and a resume across it
class _Batches:
    """Resumable fixed-order batches of random token-classification data."""

    def __init__(self, n_vocab: int) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(5, n_vocab, (12, 8), generator=g)
        self.labels = torch.randint(0, 3, (12, 8), generator=g)
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        start = (self.i % 3) * 4
        self.i += 1
        return self.ids[start:start + 4], self.labels[start:start + 4]

    def state_dict(self):
        return {"data.i": torch.tensor(self.i)}

    def load_state_dict(self, state):
        self.i = int(state["data.i"])


class _Stop(Exception):
    pass


def _task_run(base, reset_head: bool, ckpt_dir=None, stop_at: int | None = None, resume=None):
    cfg = TrainConfig(lr=1e-3, batch_size=4, warmup_ratio=0.0, checkpoint_every=2, log_every=100, device="cpu",
                      precision="fp32")
    torch.manual_seed(0)
    head = TokenClassificationHead(base.hidden_size, 3, dropout=0.0)
    trainable = SFTTrainable(base, SFTConfig(num_params=200, full_steps=4, sparse_steps=4, reset_head=reset_head), cfg)
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        if stop_at is not None and calls["n"] > stop_at:
            raise _Stop
        ids, labels = batch
        logits = head(base.encoder(input_ids=ids).last_hidden_state)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1))

    base.model.train()
    run = PhaseRun(trainable, {"head": head}, _Batches(len(base.tokenizer)), {}, loss_fn, None, cfg, NullTracker(),
                   "t", ckpt_dir, Dist())
    try:
        run_phases(run, resume)
        return trainable.delta(), {k: v.clone() for k, v in head.state_dict().items()}, head
    finally:
        trainable.close()
        base.model.eval()


def test_head_reset_before_phase2_and_resume_across_it_is_bit_identical(base, tmp_path):
    from xlpeft.checkpoint import load_checkpoint

    torch.manual_seed(0)
    initial = TokenClassificationHead(base.hidden_size, 3, dropout=0.0).state_dict()
    delta, head, _ = _task_run(base, reset_head=True)
    kept_delta, kept_head, _ = _task_run(base, reset_head=False)
    assert any(not torch.equal(head[k], kept_head[k]) for k in head)  # the reset changes the result
    # phase 1 + reset + 4 sparse steps: the reset head moved only in phase 2, so it is closer to the initial one
    moved = sum(float((head[k] - initial[k]).abs().sum()) for k in head)
    kept_moved = sum(float((kept_head[k] - initial[k]).abs().sum()) for k in head)
    assert moved < kept_moved
    with pytest.raises(_Stop):  # interrupted in phase 1, after the step-2 checkpoint
        _task_run(base, reset_head=True, ckpt_dir=tmp_path / "ckpt", stop_at=3)
    resumed_delta, resumed_head, _ = _task_run(base, reset_head=True, resume=load_checkpoint(tmp_path / "ckpt"))
    for k in head:
        assert torch.equal(resumed_head[k], head[k]), k
    for n, (idx, vals) in delta.entries.items():
        assert torch.equal(resumed_delta.entries[n][0], idx) and torch.equal(resumed_delta.entries[n][1], vals), n


def test_xlpeft_methods_prints_the_per_kind_defaults(capsys):
    from xlpeft.cli import main

    try:
        main(["methods"])
    except SystemExit as done:
        assert done.code in (0, None)
    out = capsys.readouterr().out
    sft = out[out.index("sft:"):out.index("training (all methods)")]
    assert "language modules default to: l1=0.1, freeze_decoder=True, lr=5e-05, warmup_ratio=0.0" in sft
    assert "task modules default to: reference_num_params=14155776, full_epochs=3, sparse_epochs=10, lr=5e-05" in sft
    assert "--set movement=paper" in sft and "--set reset_head=True" in sft
