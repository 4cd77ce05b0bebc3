"""LT-SFT with the FISH mask and diff pruning as its phase 1 (issue 19): through SFTTrainable and the training loop."""

import math

import pytest
import torch

from tests.methods.mlm_data import masked_loss, random_batches
from xlpeft.config import TrainConfig
from xlpeft.errors import ConfigError
from xlpeft.methods.sft import SFTConfig, SFTTrainable, split_steps
from xlpeft.methods.sft.selection import top_k_indices
from xlpeft.training import train_loop

_batches, _loss = random_batches, masked_loss


def _run_phase(base, t, phase, cfg, steps, batches, loss):
    params = t.begin_phase(phase)
    train_loop(params, batches, loss, cfg, steps, lambda *_: None, after_step=lambda s: t.after_step(phase, s),
               progress=False)


def test_fisher_phase_counts_samples_not_training_steps():
    config = SFTConfig(num_params=10, selection="fisher", fisher_samples=100)
    assert split_steps(config, 40, examples_per_step=16) == (math.ceil(100 / 16), 40)  # the sparse phase keeps all 40
    assert split_steps(SFTConfig(num_params=10, selection="fisher", full_steps=3), 40, 16) == (3, 40)
    with pytest.raises(ConfigError, match="full_steps"):
        SFTConfig(selection="fisher", full_steps=0)


def test_fisher_mask_is_the_top_k_of_summed_squared_gradients_and_theta0_never_moves(base):
    cfg = TrainConfig(lr=1e-2, max_steps=4, batch_size=4, log_every=100)
    t = SFTTrainable(base, SFTConfig(num_params=300, selection="fisher", fisher_samples=12), cfg)
    full = t.phases[0]
    assert (full.name, full.steps) == ("full", 3)  # 12 examples / 4 per step
    theta0 = {n: p.detach().clone() for n, p in t.params.items()}
    # by hand: the same three micro-batches, squared gradients summed at theta0
    base.model.eval()
    batches, loss = _batches(base), _loss(base)
    replay_b, replay_l = _batches(base), _loss(base)
    params = list(t.params.values())
    for p in params:
        p.requires_grad_(True)
    by_hand = {n: torch.zeros_like(p) for n, p in t.params.items()}
    for _ in range(3):
        grads = torch.autograd.grad(replay_l(next(replay_b)), params)
        for n, g in zip(t.params, grads, strict=True):
            by_hand[n] += g * g
    for p in params:
        p.requires_grad_(False)
    base.model.eval()  # no dropout: the by-hand pass and the phase see the same network
    _run_phase(base, t, full, cfg, full.steps, batches, loss)
    assert all(torch.equal(p, theta0[n]) for n, p in t.params.items()), "FISH's phase 1 must not move a weight"
    fisher = {n: t._fisher(n).clone() for n in t.params}
    for n in t.params:
        torch.testing.assert_close(fisher[n], by_hand[n], rtol=1e-4, atol=1e-9)
    metrics = t.end_phase(full)
    expected = top_k_indices({n: p.numel() for n, p in t.params.items()}, lambda n: fisher[n], 300,
                             generator=torch.Generator().manual_seed(cfg.seed))
    assert metrics["selected_params"] == 300
    assert {n: i.tolist() for n, i in t.indices.items()} == {n: i.tolist() for n, i in expected.items() if len(i)}
    t.close()


def test_diff_pruning_trains_gates_selects_k_and_resets_to_theta0(base):
    cfg = TrainConfig(lr=1e-3, max_steps=6, batch_size=4, log_every=100)
    config = SFTConfig(num_params=300, selection="diff_pruning", diff_l0=1e-3)
    t = SFTTrainable(base, config, cfg)
    full, sparse = t.phases
    assert (full.steps, sparse.steps) == (3, 3)
    theta0 = {n: p.detach().clone() for n, p in t.params.items()}
    base.model.train()
    _run_phase(base, t, full, cfg, full.steps, _batches(base), _loss(base))
    diff = t._diff
    assert diff.alpha_scale == pytest.approx(0.1 / 1e-3)
    moved_alpha = max(float((diff._true_alpha(n) - 5.0).abs().max()) for n in t.params)
    assert moved_alpha > 0.05, "the gates' log-alphas should train at diff_alpha_lr (0.1), not at lr"
    assert any(not torch.equal(p, theta0[n]) for n, p in t.params.items()), "phase 1 writes theta0 + z * w"
    metrics = t.end_phase(full)
    assert metrics["selected_params"] == 300
    assert all(torch.equal(p, theta0[n]) for n, p in t.params.items())
    _run_phase(base, t, sparse, cfg, sparse.steps, _batches(base, 3), _loss(base, 4))
    t.end_phase(sparse)
    assert t.delta().num_params == 300
    t.close()
    assert all(torch.equal(p, theta0[n]) for n, p in t.params.items())


@pytest.mark.parametrize("selection", ["fisher", "diff_pruning"])
def test_phase_one_resumes_bit_identically_on_a_fresh_base(base, selection):
    """state_dict after 2 steps -> a fresh base and trainable; both then take the same 2 steps (each
    with a fresh optimizer: restoring AdamW is the loop's job) and end with identical scores."""
    from xlpeft.models import load_base

    cfg = TrainConfig(lr=1e-3, max_steps=8, batch_size=4, log_every=100)
    config = SFTConfig(num_params=200, selection=selection, full_steps=4, fisher_samples=16)

    def steps(on, t, params, n, seed):
        on.model.eval()  # dropout would draw from the global generator: the two runs must see one network
        train_loop(params, _batches(on, seed), _loss(on, seed + 1), cfg, n, lambda *_: None,
                   after_step=lambda s: t.after_step(t.phases[0], s), progress=False)

    a = SFTTrainable(base, config, cfg)
    pa = a.begin_phase(a.phases[0])
    steps(base, a, pa, 2, 0)
    state = a.state_dict()
    fresh = load_base(str(base.path))
    b = SFTTrainable(fresh, config, cfg)
    pb = b.resume_phase(b.phases[0], state)
    assert all(torch.equal(x, y) for x, y in zip(b.params.values(), a.params.values(), strict=True))
    assert all(torch.equal(x, y) for x, y in zip(pb, pa, strict=True))
    steps(base, a, pa, 2, 7)
    steps(fresh, b, pb, 2, 7)
    score_a, score_b = a._fisher or a._diff, b._fisher or b._diff
    assert all(torch.equal(score_a(n), score_b(n)) for n in a.params)
    assert any(bool(score_a(n).any()) for n in a.params)
    a.close()
    b.close()
