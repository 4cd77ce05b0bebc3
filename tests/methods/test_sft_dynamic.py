"""SpIEL's dynamic sparse delta: K fixed at every step, drop to theta0, grow where the gradient is, exact resume."""

import pytest
import torch

from tests.methods.mlm_data import masked_loss, random_batches
from xlpeft.config import TrainConfig
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.methods.sft import SFTConfig, SFTTrainable, SparseDelta
from xlpeft.methods.sft.dynamic import allocate, random_subset
from xlpeft.training import train_loop

_batches, _loss = random_batches, masked_loss


def _dynamic(**kw):
    return SFTConfig(**{"num_params": 600, "selection": "dynamic", "reselect_every": 4, "accumulation_steps": 2,
                        "reselection_rate": 0.5, **kw})


def test_allocate_is_proportional_and_exact():
    counts = allocate({"a": 1000, "b": 10, "c": 333}, 101)
    assert sum(counts.values()) == 101 and counts["a"] == 75 and counts["b"] in (0, 1)
    with pytest.raises(XlpeftError, match="K should be in 1..1343"):
        allocate({"a": 1000, "b": 10, "c": 333}, 5000)


@pytest.mark.parametrize("numel,k", [(10, 10), (100, 30), (10**7, 500)])
def test_random_subset_is_distinct_sorted_and_seeded(numel, k):
    a = random_subset(numel, k, torch.Generator().manual_seed(3))
    b = random_subset(numel, k, torch.Generator().manual_seed(3))
    assert len(a) == k and torch.equal(a, b) and torch.equal(a, torch.unique(a)) and int(a.max()) < numel


@pytest.mark.parametrize("growth", ["rigl", "sm3"])
def test_k_is_exact_and_only_the_mask_moves_at_every_step(base, growth):
    theta0 = {n: p.detach().clone() for n, p in base.model.named_parameters(remove_duplicate=False)}
    cfg = TrainConfig(lr=1e-2, max_steps=13, log_every=100)
    t = SFTTrainable(base, _dynamic(growth=growth), cfg)
    assert [(p.name, p.steps) for p in t.phases] == [("sparse", 13)]  # no dense phase
    params = t.begin_phase(t.phases[0])
    history = []

    def check(step):
        t.after_step(t.phases[0], step)
        assert sum(len(i) for i in t.indices.values()) == 600
        for name, idx in t.indices.items():
            assert len(torch.unique(idx)) == len(idx), f"{name}: an entry is held twice"
            flat, ref = t.params[name].detach().view(-1), theta0[name].view(-1)
            outside = torch.ones_like(flat, dtype=torch.bool)
            outside[idx] = False
            assert torch.equal(flat[outside], ref[outside]), f"{name} changed outside the mask (dropped not at theta0?)"
            assert torch.equal(flat[idx], ref[idx] + t.values[name].detach())
        history.append({n: i.clone() for n, i in t.indices.items()})

    base.model.train()
    train_loop(params, _batches(base), _loss(base), cfg, 13, lambda *_: None, after_step=check, progress=False)
    metrics = t.end_phase(t.phases[0])
    # reselections after steps 2 (all replaced), 6 and 10 (0.5 * (1 - c/T) of K)
    assert metrics["reselections"] == 3 and metrics["replaced_entries"] > 600
    changed = [sum(int((~torch.isin(b[n], a[n])).sum()) for n in a) for a, b in zip(history, history[1:], strict=False)]
    assert [i for i, c in enumerate(changed, start=2) if c] == [2, 6, 10]
    delta = t.delta()
    assert delta.num_params == 600 and all(torch.equal(i, torch.sort(i).values) for i, _ in delta.entries.values())
    t.close()
    assert all(torch.equal(p, theta0[n]) for n, p in base.model.named_parameters(remove_duplicate=False)), "close restores theta0"


def test_rigl_grows_the_largest_accumulated_gradients_and_seeds_their_moments(base):
    cfg = TrainConfig(lr=1e-3, max_steps=8, log_every=100)
    t = SFTTrainable(base, _dynamic(reselection_rate=1.0), cfg)
    params = t.begin_phase(t.phases[0])
    seen = {}

    def spy(step):
        if step == 2:  # the first window (steps 1-2) closes here: its statistics, before the reselection
            seen.update({n: (c[0].clone(), (c[1] / c[3]).clone(), (c[2] / c[3]).clone())
                         for n, c in t.selector.candidates.items()})
            seen["optimizer"] = None
        t.after_step(t.phases[0], step)
        if step == 2:
            opt = t.selector.optimizer
            name = max(t.indices, key=lambda n: len(t.indices[n]))
            cand, mean_g, mean_g2 = seen[name]
            idx = t.indices[name]
            best = cand[torch.topk(mean_g.abs(), len(idx)).indices]  # the first reselection replaces everything
            assert torch.equal(torch.sort(idx).values, torch.sort(best).values)
            state = opt.state[t.values[name]]
            pos = {int(c): j for j, c in enumerate(cand)}
            slot = int(torch.nonzero(t.values[name] == 0)[0])  # a grown entry (value 0)
            j = pos[int(idx[slot])]
            b1, b2 = opt.param_groups[0]["betas"]
            torch.testing.assert_close(state["exp_avg"][slot] / (1 - b1 ** float(state["step"])), mean_g[j])
            torch.testing.assert_close(state["exp_avg_sq"][slot] / (1 - b2 ** float(state["step"])), mean_g2[j])
            seen["optimizer"] = opt

    base.model.train()
    train_loop(params, _batches(base), _loss(base), cfg, 3, lambda *_: None, after_step=spy, progress=False)
    assert seen["optimizer"] is not None
    t.close()


def test_dynamic_delta_resumes_inside_a_window_on_a_fresh_base(base):
    """state_dict mid-window (candidates held) -> a fresh base and trainable continue bit for bit."""
    from xlpeft.models import load_base

    cfg = TrainConfig(lr=1e-2, max_steps=9, log_every=100)
    a = SFTTrainable(base, _dynamic(), cfg)
    pa = a.begin_phase(a.phases[0])
    base.model.train()
    train_loop(pa, _batches(base), _loss(base), cfg, 4, lambda *_: None,
               after_step=lambda s: a.after_step(a.phases[0], s), progress=False)
    assert a.selector.accumulating and a.selector.candidates, "step 4 is inside the window of steps 4-6"
    state = a.state_dict()
    fresh = load_base(str(base.path))
    b = SFTTrainable(fresh, _dynamic(), cfg)
    b.resume_phase(b.phases[0], state)
    assert all(torch.equal(b.indices[n], a.indices[n]) for n in a.indices)
    assert all(torch.equal(b.params[n], p) for n, p in a.params.items())
    assert b.selector.candidates.keys() == a.selector.candidates.keys()
    assert all(torch.equal(x, y) for n in a.selector.candidates
               for x, y in zip(a.selector.candidates[n], b.selector.candidates[n], strict=True))
    a.close()
    b.close()


def test_dynamic_delta_composes_with_an_lt_sft_delta_like_by_hand(base):
    cfg = TrainConfig(lr=1e-2, max_steps=6, log_every=100)
    t = SFTTrainable(base, _dynamic(), cfg)
    p = t.begin_phase(t.phases[0])
    train_loop(p, _batches(base), _loss(base), cfg, 6, lambda *_: None,
               after_step=lambda s: t.after_step(t.phases[0], s), progress=False)
    dynamic = t.delta()
    t.close()
    g = torch.Generator().manual_seed(5)
    other = SparseDelta({n: (torch.sort(torch.randperm(p.numel(), generator=g)[:50]).values, torch.randn(50, generator=g))
                         for n, p in list(t.params.items())[:3]})
    params = dict(base.model.named_parameters(remove_duplicate=False))
    by_hand = {n: params[n].detach().clone() for n in set(dynamic.entries) | set(other.entries)}
    for delta in (dynamic, other):
        for n, (idx, vals) in delta.entries.items():
            by_hand[n].view(-1).index_add_(0, idx, vals)
    dynamic.apply(base.model)
    other.apply(base.model)
    assert all(torch.equal(params[n], w) for n, w in by_hand.items())
    other.revert(base.model)
    dynamic.revert(base.model)


def test_bad_dynamic_settings_say_what_to_do():
    with pytest.raises(ConfigError, match="accumulation_steps.*below"):
        SFTConfig(selection="dynamic", reselect_every=5, accumulation_steps=5)
    with pytest.raises(ConfigError, match="no dense phase"):
        SFTConfig(selection="dynamic", full_steps=3)
    with pytest.raises(ConfigError, match="growth"):
        SFTConfig(selection="dynamic", growth="random")
