"""FISH-mask and diff-pruning scorers: the math against hand computation and autograd, selections, resume."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.methods.sft.criteria import DiffPruning, FisherScores
from xlpeft.methods.sft.selection import top_k_indices


def _hook(model: nn.Module, handle) -> list:
    """Per parameter, a post-accumulate-grad hook that hands the gradient over and drops it (as SFTTrainable does)."""
    def make(name):
        def hook(p):
            handle(name, p.grad)
            p.grad = None
        return hook
    return [p.register_post_accumulate_grad_hook(make(n)) for n, p in model.named_parameters()]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)) for _ in range(n)]


def _loss(model, x, y, params=None):
    out = model(x) if params is None else functional_call(model, params, (x,))
    return nn.functional.mse_loss(out, y)


def _dense_top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Reference: all scores concatenated in tensor order, stable sort descending, first k."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = torch.sort(order[(order >= offset) & (order < offset + s.numel())] - offset).values
        offset += s.numel()
    return out


def _magnitude_top_k(theta0: torch.Tensor, batches, k: int, lr: float = 0.1) -> set[int]:
    """LT-SFT's phase 1 on ``y = x @ w`` with loss ``y.sum()`` (gradient = x): top-k of |theta1 - theta0|."""
    w = nn.Parameter(theta0.clone())
    opt = torch.optim.SGD([w], lr=lr)
    for x in batches:
        (x @ w).sum().backward()
        opt.step()
        opt.zero_grad()
    return set(top_k_indices({"w": w.numel()}, lambda n: (w.detach() - theta0).abs(), k)["w"].tolist())


# ---- FISH
def test_fisher_scores_are_the_sum_of_squared_step_gradients_and_weights_stay_at_theta0():
    model = _mlp()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = FisherScores(dict(model.named_parameters()))
    hooks = _hook(model, fisher.accumulate)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)  # would move every weight if a gradient reached it
    batches = _batches(3)
    for x, y in batches:
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    for h in hooks:
        h.remove()
    assert fisher.batches == 3
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), theta0[name]), name  # no update: the Fisher is taken at theta0
    ref = {n: torch.zeros_like(p) for n, p in theta0.items()}  # the gradients by autograd, squared and summed by hand
    for x, y in batches:
        grads = torch.autograd.grad(_loss(model, x, y), list(model.parameters()))
        for n, g in zip(ref, grads, strict=True):
            ref[n] += g * g
    for n in ref:
        assert ref[n].abs().max() > 0
        torch.testing.assert_close(fisher(n), ref[n], rtol=1e-6, atol=1e-12)
        assert fisher(n).dtype == torch.float32 and fisher(n).shape == theta0[n].shape


def test_fisher_picks_a_large_gradient_that_does_not_move_where_magnitude_picks_the_movers():
    # entries 0, 1: gradients +G, -G alternating (large, but the weight returns to theta0 after each pair);
    # entries 2, 3: a small gradient of one sign every step (the weight moves steadily)
    steps, big, small = 6, 5.0, 0.2
    batches = [torch.tensor([[big, 0.8 * big, small, 0.9 * small]]) * torch.tensor([[(-1) ** t, (-1) ** t, 1, 1]])
               for t in range(steps)]
    theta0 = torch.randn(4, 1, generator=torch.Generator().manual_seed(0))
    magnitude = _magnitude_top_k(theta0, batches, k=2)
    fisher = FisherScores({"w": nn.Parameter(theta0.clone())})
    for x in batches:  # at theta0: the gradient of (x @ w).sum() is x
        fisher.accumulate("w", x.t())
    fish = set(top_k_indices({"w": 4}, fisher, 2)["w"].tolist())
    assert magnitude == {2, 3}
    assert fish == {0, 1}


def test_fisher_state_dict_round_trip_continues_bit_identically():
    params = {"a": nn.Parameter(torch.zeros(3, 4)), "b": nn.Parameter(torch.zeros(7))}
    gen = torch.Generator().manual_seed(0)
    grads = [{n: torch.randn(p.shape, generator=gen) for n, p in params.items()} for _ in range(3)]
    straight, resumed = FisherScores(params), FisherScores(params)
    for g in grads[:2]:
        for n in params:
            straight.accumulate(n, g[n])
    straight.accumulate("a", grads[2]["a"])  # "b" not reached by this batch
    resumed.load_state_dict({k: v.clone() for k, v in straight.state_dict().items()})
    assert resumed.batches == straight.batches == 3
    for target in (straight, resumed):
        target.accumulate("b", grads[2]["b"])
    for n in params:
        assert torch.equal(resumed(n), straight(n)), n
    with pytest.raises(XlpeftError, match="missing"):
        resumed.load_state_dict({k: v for k, v in straight.state_dict().items() if k != "fisher.batches"})


# ---- diff pruning
def _gated(model, theta0=None, seed=3, l0=0.3, init_w_std=0.5, **kw):
    params = dict(model.named_parameters())
    theta0 = theta0 if theta0 is not None else {n: p.detach().clone() for n, p in params.items()}
    dp = DiffPruning(params, theta0, l0=l0, seed=seed, init_w_std=init_w_std, **kw)
    with torch.no_grad():  # alphas spread so that gates are closed, open and in between
        for a in dp.alpha.values():
            a.normal_(0.5, 2.0, generator=torch.Generator().manual_seed(seed))
    return dp, theta0


def _z(dp, name, u=None):
    """The gate as written in Louizos et al. (2018): z = clamp(sigmoid((log u - log(1-u) + alpha)/beta)(zeta-gamma)+gamma, 0, 1)."""
    alpha = dp.alpha[name]
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + alpha) / dp.beta) if u is not None else torch.sigmoid(alpha)
    return torch.clamp(s * (dp.zeta - dp.gamma) + dp.gamma, 0.0, 1.0)


def _reference_grads(dp, theta0, model, micro_batches):
    """Autograd on theta0 + z(alpha) * w for the sum of the micro-batch losses plus the expected-L0 penalty."""
    w = {n: v.detach().clone().requires_grad_() for n, v in dp.w.items()}
    alpha = {n: v.detach().clone().requires_grad_() for n, v in dp.alpha.items()}
    ref = DiffPruning.__new__(DiffPruning)  # only the hyper-parameters, for _z
    ref.alpha, ref.beta, ref.gamma, ref.zeta = alpha, dp.beta, dp.gamma, dp.zeta
    theta = {n: theta0[n] + _z(ref, n, dp.uniform(n)) * w[n] for n in w}
    total = sum(_loss(model, x, y, theta) for x, y in micro_batches)
    shift = dp.beta * math.log(-dp.gamma / dp.zeta)
    total = total + dp.l0 * sum(torch.sigmoid(a - shift).sum() for a in alpha.values()) / dp.num_params
    grads = torch.autograd.grad(total, [*w.values(), *alpha.values()])
    return theta, dict(zip(w, grads[:len(w)], strict=True)), dict(zip(alpha, grads[len(w):], strict=True))


def test_diff_pruning_chain_rule_matches_autograd_over_two_micro_batches():
    model = _mlp()
    dp, theta0 = _gated(model)
    hooks = _hook(model, dp.backward)
    dp.write(train=True)
    micro = _batches(2)
    for x, y in micro:
        _loss(model, x, y).backward()
    for h in hooks:
        h.remove()
    theta, ref_w, ref_alpha = _reference_grads(dp, theta0, model, micro)
    z = torch.cat([_z(dp, n, dp.uniform(n)).detach().reshape(-1) for n in dp.w])
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()  # every branch of the clamp is exercised
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), theta[n].detach(), rtol=1e-6, atol=1e-7)  # the forward read theta0 + z w
        assert p.grad is None
        assert ref_alpha[n].abs().max() > 1e-4
        torch.testing.assert_close(dp.w[n].grad, ref_w[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(dp.alpha[n].grad, ref_alpha[n], rtol=1e-5, atol=1e-7)


def test_diff_pruning_penalty_gradient_matches_autograd_and_is_added_once_per_step():
    model = _mlp()
    dp, theta0 = _gated(model, l0=2.0, init_w_std=0.0, num_params=10)  # w = 0: alpha's task gradient vanishes
    shift = dp.beta * math.log(-dp.gamma / dp.zeta)
    alpha = {n: a.detach().clone().requires_grad_() for n, a in dp.alpha.items()}
    penalty = dp.l0 * sum(torch.sigmoid(a - shift).sum() for a in alpha.values()) / 10
    ref = dict(zip(alpha, torch.autograd.grad(penalty, list(alpha.values())), strict=True))
    assert dp.penalty() == pytest.approx(float(penalty.detach()), rel=1e-6)
    dp.write(train=True)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):  # two micro-batches
        for n, p in model.named_parameters():
            dp.backward(n, torch.randn(p.shape, generator=gen))
    for n in dp.alpha:
        torch.testing.assert_close(dp.alpha[n].grad, ref[n], rtol=1e-6, atol=1e-10)
    dp.write(train=True)  # a new step: the penalty is due again
    for n, p in model.named_parameters():
        dp.backward(n, torch.zeros(p.shape))
    for n in dp.alpha:
        torch.testing.assert_close(dp.alpha[n].grad, 2 * ref[n], rtol=1e-6, atol=1e-10)


def test_diff_pruning_eval_gates_are_deterministic_and_training_gates_are_sampled():
    model = _mlp()
    dp, theta0 = _gated(model)
    weights = lambda: {n: p.detach().clone() for n, p in model.named_parameters()}  # noqa: E731
    dp.write(train=False)
    first = weights()
    dp.write(train=False)
    second = weights()
    for n in first:
        assert torch.equal(first[n], second[n])
        torch.testing.assert_close(first[n], theta0[n] + _z(dp, n).detach() * dp.w[n].detach(), rtol=1e-6, atol=1e-7)
    dp.write(train=True)
    sampled_a = weights()
    dp.write(train=True)
    sampled_b = weights()
    assert any(not torch.equal(sampled_a[n], sampled_b[n]) for n in first)
    assert any(not torch.equal(sampled_a[n], first[n]) for n in first)
    assert not torch.equal(dp.uniform("0.weight").reshape(-1)[:4], dp.uniform("2.weight").reshape(-1)[:4])


def test_diff_pruning_state_dict_round_trip_samples_the_same_gates():
    model = _mlp()
    dp, theta0 = _gated(model, seed=11)
    for step in range(3):
        dp.write(train=True)
        with torch.no_grad():  # as if trained: the state holds other values than a fresh start
            for t in dp.parameters():
                t.add_(0.05 * (step + 1))
    state = {k: v.clone() for k, v in dp.state_dict().items()}
    dp.write(train=True)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    fresh, _ = _gated(model, theta0, seed=11)
    fresh.write(train=True)  # without the state: the first draw, not the fourth
    assert any(not torch.equal(p.detach(), expected[n]) for n, p in model.named_parameters())
    other = DiffPruning(dict(model.named_parameters()), theta0, l0=0.3, seed=11, init_alpha=-1.0, init_w_std=0.1)
    other.write(train=True)
    other.load_state_dict(state)
    other.write(train=True)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), expected[n]), n
    wrong_seed, _ = _gated(model, theta0, seed=12)
    with pytest.raises(XlpeftError, match="seed 11"):
        wrong_seed.load_state_dict(state)


@pytest.mark.parametrize("l0", [0.0, 1e-3])
def test_diff_pruning_keeps_a_moved_entry_whose_gate_the_penalty_closed_out_of_the_top_k(l0):
    # entries 0, 1: one large gradient at step 0, none after (full fine-tuning moves them most; no loss term keeps
    # their gate open, so the L0 penalty closes it); entries 2, 3: a small gradient every step (moved less, but
    # their diffs keep lowering the loss, so their gates stay open). Without the penalty (l0 = 0) diff pruning
    # agrees with magnitude: the penalty is what makes the difference.
    steps = 60
    batches = [torch.tensor([[100.0, 80.0, 1.0, 0.9]]) if t == 0 else torch.tensor([[0.0, 0.0, 1.0, 0.9]])
               for t in range(steps)]
    theta0 = torch.randn(4, 1, generator=torch.Generator().manual_seed(0))
    magnitude = _magnitude_top_k(theta0, batches, k=2)
    w = nn.Parameter(theta0.clone())
    dp = DiffPruning({"w": w}, {"w": theta0}, l0=l0, seed=0, init_alpha=1.0)
    (hook,) = _hook(nn.ParameterDict({"w": w}), dp.backward)
    opt_w = torch.optim.SGD(list(dp.w.values()), lr=0.1)
    opt_alpha = torch.optim.Adam(list(dp.alpha.values()), lr=0.1)  # Guo et al.: alpha gets its own optimizer, lr 0.1
    for x in batches:
        dp.write(train=True)
        (x @ w).sum().backward()
        for opt in (opt_w, opt_alpha):
            opt.step()
            opt.zero_grad()
    hook.remove()
    diff = set(top_k_indices({"w": 4}, dp, 2)["w"].tolist())
    assert magnitude == {0, 1}
    if l0 == 0:
        assert diff == magnitude
    else:
        assert diff == {2, 3}
        assert dp("w").reshape(-1)[:2].max() == 0  # the closed gates score exactly zero


def test_top_k_indices_runs_on_both_scorers_as_on_dense_scores():
    params = {"a": nn.Parameter(torch.randn(40, 30)), "b": nn.Parameter(torch.randn(50))}
    fisher = FisherScores(params)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        for n, p in params.items():
            fisher.accumulate(n, torch.randn(p.shape, generator=gen))
    dp = DiffPruning(params, {n: p.detach().clone() for n, p in params.items()}, l0=0.1, seed=0, init_w_std=1.0)
    with torch.no_grad():
        for a in dp.alpha.values():
            a.normal_(0.0, 2.0, generator=gen)  # some gates closed: ties at zero, broken by tensor order then index
    numels = {n: p.numel() for n, p in params.items()}
    for scorer in (fisher, dp):
        dense = {n: scorer(n).clone() for n in params}
        for k in (1, 77, 600):
            got = top_k_indices(numels, scorer, k, sample_size=100)
            ref = _dense_top_k(dense, k)
            assert sum(len(i) for i in got.values()) == k
            for n in params:
                assert torch.equal(got[n], ref[n]), (type(scorer).__name__, k, n)
    assert (dp("a") == 0).any()


def test_diff_pruning_extra_memory_is_six_fp32_copies_as_adamw_allocates():
    model = _mlp()
    dp, _ = _gated(model)
    opt = torch.optim.AdamW(dp.parameters(), lr=1e-3)
    hooks = _hook(model, dp.backward)
    dp.write(train=True)
    x, y = _batches(1)[0]
    _loss(model, x, y).backward()
    opt.step()
    for h in hooks:
        h.remove()
    state = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    used = sum(t.numel() * t.element_size() for t in [*dp.parameters(), *state])
    assert dp.extra_memory_bytes() == used == 6 * 4 * sum(p.numel() for p in model.parameters())


def test_bad_arguments_say_what_was_expected_and_received():
    p = {"w": nn.Parameter(torch.zeros(2, 2))}
    t0 = {"w": torch.zeros(2, 2)}
    for kwargs, text in (({"gamma": 0.1}, "`gamma` should be < 0; got 0.1"), ({"zeta": 0.9}, "`zeta` should be > 1; got 0.9"),
                         ({"l0": -1.0}, "`l0` should be >= 0; got -1.0"), ({"beta": float("nan")}, "`beta` should be > 0; got nan")):
        with pytest.raises(ConfigError, match=text.replace("(", r"\(")):
            DiffPruning(p, t0, **{"l0": 0.1, "seed": 0, **kwargs})
    with pytest.raises(ConfigError, match="theta0.*missing"):
        DiffPruning(p, {"v": torch.zeros(2, 2)}, l0=0.1, seed=0)
    with pytest.raises(ConfigError, match="got none"):
        FisherScores({})
    dp = DiffPruning(p, t0, l0=0.1, seed=0)
    with pytest.raises(XlpeftError, match="before write"):
        dp.backward("w", torch.zeros(2, 2))
    fisher = FisherScores(p)
    with pytest.raises(XlpeftError, match="unknown parameter 'v'"):
        fisher.accumulate("v", torch.zeros(2, 2))
    with pytest.raises(XlpeftError, match=r"shape \(2, 2\); got \(4,\)"):
        fisher.accumulate("w", torch.zeros(4))
