"""LT-SFT: exact streamed top-K, movement vs magnitude, phase 2 confined to the mask, deltas as values."""

import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from xlpeft.config import TrainConfig
from xlpeft.data.mlm import mask_tokens
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.methods.sft import (
    PeakMemory,
    SFTConfig,
    SFTTrainable,
    SparseDelta,
    default_num_params,
    maskable_parameters,
    split_steps,
    top_k_indices,
)
from xlpeft.methods.sft import selection as selection_mod
from xlpeft.methods.sft.config import MBERT_BASE_LAYER_PARAMS
from xlpeft.methods.sft.memory import rss_bytes
from xlpeft.training import mlm_loss, train_loop


def _ids(base, n=4, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, len(base.tokenizer), (n, t), generator=g)


def _dense_top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Reference: all scores concatenated in tensor order, stable sort descending, first k."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    out, offset = {}, 0
    for name, s in scores.items():
        n = s.numel()
        out[name] = torch.sort(order[(order >= offset) & (order < offset + n)] - offset).values
        offset += n
    return out


def _assert_same(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for name in ref:
        assert torch.equal(got.get(name, torch.zeros(0, dtype=torch.long)), ref[name]), name


def _scores(seed=0, quantise=False):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (50, 40), "b": (7,), "c": (300, 20), "d": (1,)}
    out = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    return {n: (s * 5).floor() for n, s in out.items()} if quantise else out


# ---- selection
@pytest.mark.parametrize("sample_size", [1 << 20, 500, 37])
@pytest.mark.parametrize("k", [1, 123, 4000, 8007])
def test_top_k_matches_dense_reference(sample_size, k):
    scores = _scores()
    got = top_k_indices({n: s.numel() for n, s in scores.items()}, scores.__getitem__, k, sample_size=sample_size)
    assert sum(len(i) for i in got.values()) == min(k, 8008)
    _assert_same(got, _dense_top_k(scores, k))


@pytest.mark.parametrize("sample_size", [1 << 20, 100])
def test_top_k_breaks_ties_by_tensor_order_then_index(sample_size):
    scores = _scores(seed=1, quantise=True)  # five levels: thousands of ties at the threshold
    got = top_k_indices({n: s.numel() for n, s in scores.items()}, scores.__getitem__, 2500, sample_size=sample_size)
    assert sum(len(i) for i in got.values()) == 2500
    _assert_same(got, _dense_top_k(scores, 2500))


def test_top_k_lowers_threshold_when_the_sample_overestimates(monkeypatch):
    scores = _scores(seed=2)
    calls = []

    def biased(numels, score, sample_size, generator):  # a sample of only the highest scores
        calls.append(1)
        return torch.sort(torch.cat([s.reshape(-1) for s in scores.values()]), descending=True).values[:200]

    original = selection_mod._count
    monkeypatch.setattr(selection_mod, "_sample", biased)
    monkeypatch.setattr(selection_mod, "_count", lambda *a: calls.append(2) or original(*a))
    got = top_k_indices({n: s.numel() for n, s in scores.items()}, scores.__getitem__, 3000, sample_size=100)
    assert calls.count(2) > 1, "a second counting pass with a lower threshold was expected"
    _assert_same(got, _dense_top_k(scores, 3000))


@pytest.mark.parametrize("sample_size", [1 << 20, 50])
def test_top_k_when_most_scores_tie_at_zero(sample_size):
    """Entries that never moved all score 0; K beyond the moved ones is filled with the first zeros."""
    g = torch.Generator().manual_seed(4)
    scores = {n: torch.zeros(s) for n, s in {"a": (100, 30), "b": (500,), "c": (40, 40)}.items()}
    scores["b"][torch.randperm(500, generator=g)[:60]] = torch.rand(60, generator=g) + 0.1
    scores["c"].view(-1)[torch.randperm(1600, generator=g)[:40]] = torch.rand(40, generator=g) + 0.1
    numels = {n: s.numel() for n, s in scores.items()}
    for k in (50, 100, 2000, 4000):
        got = top_k_indices(numels, scores.__getitem__, k, sample_size=sample_size)
        assert sum(len(i) for i in got.values()) == k
        _assert_same(got, _dense_top_k(scores, k))


def test_magnitude_selection_is_the_dense_top_k_on_a_tiny_model(base):
    cfg = SFTConfig(num_params=300, selection="magnitude", full_steps=1, sparse_steps=1)
    trainable = SFTTrainable(base, cfg, TrainConfig())
    theta0 = {n: p.detach().clone() for n, p in trainable.params.items()}
    trainable.begin_phase(trainable.phases[0])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # stands in for phase 1's training
        for p in trainable.params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    reference = _dense_top_k({n: (p.detach() - theta0[n]).abs() for n, p in trainable.params.items()}, 300)
    metrics = trainable.end_phase(trainable.phases[0])
    assert metrics["selected_params"] == 300 and metrics["selection_seconds"] >= 0
    _assert_same(trainable.indices, {n: i for n, i in reference.items() if len(i)})
    for name, p in trainable.params.items():  # reset to theta0 after selection
        assert torch.equal(p, theta0[name]) and not p.requires_grad
    trainable.close()


def _hand_built_phase1(base, selection: str, steps: int = 3) -> dict[str, torch.Tensor]:
    """movement=delta. Entry A travels far but against its gradient; entry B moves a little, always the way the loss wants.

    S = -sum_t g_t * (theta_t - theta0): A scores -steps * 0.5 * 1.0 (< 0), B +steps * 0.5 * 0.1 (> 0),
    all others 0; |theta1 - theta0| is 1.0 for A, 0.1 for B. So with K = 1 magnitude keeps A, movement keeps B.
    """
    trainable = SFTTrainable(base, SFTConfig(num_params=1, selection=selection, movement="delta", full_steps=steps,
                                             sparse_steps=1), TrainConfig())
    name = next(n for n in trainable.params if n.endswith("query.weight"))
    p = trainable.params[name]
    phase = trainable.phases[0]
    trainable.begin_phase(phase)
    theta0 = p.detach().clone()
    for step in range(1, steps + 1):
        grads = {n: torch.zeros_like(q) for n, q in trainable.params.items()}
        with torch.no_grad():
            p.copy_(theta0)
            p.view(-1)[0] += 1.0  # A
            p.view(-1)[1] += 0.1  # B
        grads[name].view(-1)[0] = 0.5  # the loss wants A to go down
        grads[name].view(-1)[1] = -0.5  # ... and B to go up
        for n, q in trainable.params.items():
            q.grad = grads[n]
        trainable.after_step(phase, step)
    if selection == "movement":
        s = trainable._movement.scores[name].view(-1)
        assert s[0].item() == pytest.approx(-steps * 0.5) and s[1].item() == pytest.approx(steps * 0.05)
    trainable.end_phase(phase)
    indices = dict(trainable.indices)
    trainable.close()
    return {"name": name, **indices}


def test_movement_and_magnitude_masks_differ(base):
    magnitude = _hand_built_phase1(base, "magnitude")
    movement = _hand_built_phase1(base, "movement")
    name = magnitude["name"]
    assert magnitude[name].tolist() == [0]
    assert movement[name].tolist() == [1]


@pytest.mark.parametrize("movement, keeps", [("paper", 0), ("delta", 1)])
def test_paper_and_delta_movement_differ_on_a_constructed_case(base, movement, keeps):
    """A sits at theta0 = 2.0 and never moves, its gradient -0.1 pushing it away from zero; B starts at 0 and moved to 0.1,
    gradient -0.5. Paper, -g * theta at the weights g was taken at: A 0.2, B 0.05 per step. Delta, -g * (theta - theta0):
    A 0, B 0.05. So with K = 1 paper keeps A, delta keeps B. The paper scores are taken by the optimizer pre-step hook."""
    trainable_name = next(n for n in maskable_parameters(base, SFTConfig()) if n.endswith("query.weight"))
    p = base.model.get_parameter(trainable_name)
    saved = p.detach().view(-1)[:2].clone()
    with torch.no_grad():
        p.view(-1)[:2] = torch.tensor([2.0, 0.0])
    cfg = SFTConfig(num_params=1, selection="movement", movement=movement, full_steps=3, sparse_steps=1)
    trainable = SFTTrainable(base, cfg, TrainConfig())
    phase = trainable.phases[0]
    params = trainable.begin_phase(phase)
    optimizer = torch.optim.SGD(params, lr=0.0)  # changes nothing; stepping it runs the pre-step hook
    for step in range(1, 4):
        with torch.no_grad():
            p.view(-1)[1] = 0.1  # B has moved (by hand: lr is 0)
        for q in params:
            q.grad = torch.zeros_like(q)
        p.grad.view(-1)[:2] = torch.tensor([-0.1, -0.5])
        optimizer.step()
        trainable.after_step(phase, step)
    scores = trainable._movement.scores[trainable_name].view(-1)[:2].tolist()
    expected = [0.6, 0.15] if movement == "paper" else [0.0, 0.15]
    assert scores == pytest.approx(expected, abs=1e-6)
    trainable.end_phase(phase)
    assert trainable.indices[trainable_name].tolist() == [keeps]
    trainable.close()
    with torch.no_grad():
        p.view(-1)[:2] = saved


def test_random_and_bias_selection(base):
    cfg = TrainConfig(max_steps=4, seed=3)
    rnd = SFTTrainable(base, SFTConfig(num_params=500, selection="random"), cfg)
    assert [(p.name, p.steps) for p in rnd.phases] == [("sparse", 4)]  # no phase 1 needed
    rnd.begin_phase(rnd.phases[0])
    again = SFTTrainable(base, SFTConfig(num_params=500, selection="random"), cfg)
    rnd.close()
    again.begin_phase(again.phases[0])
    assert sum(len(i) for i in rnd.indices.values()) == 500
    assert rnd.indices.keys() == again.indices.keys()
    assert all(torch.equal(rnd.indices[n], again.indices[n]) for n in rnd.indices)
    again.close()
    bitfit = SFTTrainable(base, SFTConfig(num_params=7, selection="bias"), cfg)
    bitfit.begin_phase(bitfit.phases[0])
    biases = {n: p.numel() for n, p in maskable_parameters(base, SFTConfig()).items() if n.endswith(".bias")}
    assert bitfit.delta().counts() == biases and bitfit.num_params == sum(biases.values())  # K ignored
    assert not any("LayerNorm" in n or "layer_norm" in n for n in biases)
    bitfit.close()


# ---- training phases on a tiny model
def _train(base, trainable, cfg, seed=0, phases=None):
    """Run ``phases`` (default: all of them, each ended) through the real loop on random MLM batches."""
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            yield _ids(base, seed=int(torch.randint(1 << 30, (1,), generator=gen)))

    data = batches()

    def loss_fn(ids):
        inputs, labels = mask_tokens(ids, base.tokenizer, 0.3, gen)
        return mlm_loss(base, inputs, labels)

    base.model.train()
    for phase in phases or trainable.phases:
        params = trainable.begin_phase(phase)
        train_loop(params, data, loss_fn, cfg, min(phase.steps, cfg.max_steps), lambda *_: None,
                   after_step=lambda step, p=phase: trainable.after_step(p, step), desc=phase.name)
        if phases is None:
            trainable.end_phase(phase)
    base.model.eval()


@pytest.mark.parametrize("selection", ["magnitude", "movement"])
def test_phase2_touches_only_selected_entries(base, selection):
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    cfg = TrainConfig(lr=1e-2, max_steps=6, log_every=100)
    trainable = SFTTrainable(base, SFTConfig(num_params=400, selection=selection), cfg)
    assert [(p.name, p.steps) for p in trainable.phases] == [("full", 3), ("sparse", 3)]
    _train(base, trainable, cfg)
    assert sum(v.numel() for v in trainable.values.values()) == 400  # what the optimizer held in phase 2
    moved = 0
    selected = {id(trainable.params[n]): n for n in trainable.indices}  # by tensor: tied weights have two names
    for name, p in base.model.named_parameters():
        flat, ref = p.detach().view(-1), before[name].view(-1)
        outside = torch.ones_like(flat, dtype=torch.bool)
        if id(p) in selected:
            idx, values = trainable.indices[selected[id(p)]], trainable.values[selected[id(p)]]
            outside[idx] = False
            assert torch.equal(flat[idx], ref[idx] + values.detach())
            moved += int((flat[idx] != ref[idx]).sum())
        assert torch.equal(flat[outside], ref[outside]), f"{name} changed outside the mask"
        assert p.grad is None, "dense gradients are dropped as soon as they are gathered"
    assert moved > 0
    trainable.close()
    for name, p in base.model.named_parameters():
        assert torch.equal(p, before[name]) and not p.requires_grad, f"{name} not restored exactly"


@pytest.mark.parametrize("entry_gradients,k,chunk", [("auto", 200, None), ("sampled", 3000, None), ("dense", 3000, None),
                                                     ("sampled", 3000, 100), ("dense", 3000, 100), ("autograd", 200, None)])
def test_sparse_gradient_is_the_dense_gradient_at_the_indices(base, entry_gradients, k, chunk, monkeypatch):
    """Every way of computing v.grad (taps: SDDMM, dense row blocks, row-sparse embeddings and the tied
    decoder; or autograd's dense gradient) equals autograd's weight gradient at the entries. ``chunk``:
    blocks of 100 entries, so every weight is cut into row blocks as a base-size embedding matrix is."""
    if chunk is not None:
        monkeypatch.setattr("xlpeft.methods.sft.taps.CHUNK", chunk)
    config = SFTConfig(num_params=k, selection="random", entry_gradients=entry_gradients)
    trainable = SFTTrainable(base, config, TrainConfig(max_steps=1))
    inputs, labels = mask_tokens(_ids(base), base.tokenizer, 0.3, torch.Generator().manual_seed(1))
    params = list(trainable.params.values())
    for p in params:
        p.requires_grad_(True)
    dense = dict(zip(trainable.params, torch.autograd.grad(mlm_loss(base, inputs, labels), params), strict=True))
    for p in params:
        p.requires_grad_(False)
    values = trainable.begin_phase(trainable.phases[0])
    model = base.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # a tied decoder: two taps
    assert any(n.endswith("embeddings.word_embeddings.weight") for n in trainable.indices)
    for _ in range(2):  # two micro-batches accumulate
        mlm_loss(base, inputs, labels).backward()
    for name, v in trainable.values.items():
        expected = 2 * dense[name].reshape(-1)[trainable.indices[name]]
        torch.testing.assert_close(v.grad, expected, rtol=1e-5, atol=1e-7)
    assert len(values) == len(trainable.indices)
    trainable.close()


def test_l1_adds_its_subgradient_once_per_step(base):
    cfg = TrainConfig(max_steps=1)
    plain = SFTTrainable(base, SFTConfig(num_params=50, selection="random"), cfg)
    pulled = SFTTrainable(base, SFTConfig(num_params=50, selection="random", l1=2.0), cfg)
    inputs, labels = mask_tokens(_ids(base), base.tokenizer, 0.3, torch.Generator().manual_seed(1))
    grads = []
    for t in (plain, pulled):
        t.begin_phase(t.phases[0])
        with torch.no_grad():
            for v in t.values.values():
                v.copy_(torch.linspace(-1, 1, len(v)))
        t.after_step(t.phases[0], 0)  # write the values into the weights
        mlm_loss(base, inputs, labels).backward()
        mlm_loss(base, inputs, labels).backward()
        grads.append({n: v.grad.clone() for n, v in t.values.items()})
        t.close()
    scale = 2.0 / sum(p.numel() for p in base.model.parameters())  # LT-SFT: l1 * |delta|_1 / #params
    for name, v in pulled.values.items():
        torch.testing.assert_close(grads[1][name] - grads[0][name], scale * v.detach().sign(), rtol=1e-4, atol=1e-9)


def test_export_respects_k_and_keeps_tied_head_out(base):
    cfg = TrainConfig(lr=1e-2, max_steps=4)
    trainable = SFTTrainable(base, SFTConfig(num_params=600), cfg)
    _train(base, trainable, cfg)
    tensors, extra = trainable.export()
    trainable.close()
    delta = SparseDelta.from_tensors(tensors["delta"])
    assert delta.num_params == 600 == extra["trainable_parameters"] == extra["num_params"]
    assert extra["per_tensor_counts"] == delta.counts() and extra["selection"] == "magnitude"
    head = base.arch.mlm_head + "."
    assert not any(n.startswith(head) or "LayerNorm" in n for n in delta.entries)
    maskable = maskable_parameters(base, SFTConfig())
    embeddings = base.model.get_input_embeddings().weight
    assert base.model.get_output_embeddings().weight is embeddings  # tied decoder
    tied = [n for n, p in maskable.items() if p is embeddings]
    assert tied == [f"{base.arch.encoder}.embeddings.word_embeddings.weight"]  # once, by its encoder name
    assert not any(n.startswith(head) for n in maskable)
    for name, (idx, _) in delta.entries.items():
        assert len(torch.unique(idx)) == len(idx) and int(idx.max()) < maskable[name].numel()


def test_maskable_switches(base):
    default = maskable_parameters(base, SFTConfig())
    no_emb = maskable_parameters(base, SFTConfig(include_embeddings=False))
    with_ln = maskable_parameters(base, SFTConfig(freeze_layer_norm=False))
    assert not any(".embeddings." in n for n in no_emb) and any(".embeddings." in n for n in default)
    layer_norms = [n for n in with_ln if n not in default]
    assert layer_norms and all("LayerNorm" in n for n in layer_norms)
    assert not any(n.startswith(base.arch.mlm_head + ".") for n in with_ln)  # the head's own LayerNorm stays out


@pytest.mark.parametrize("selection", ["magnitude", "movement"])
def test_state_dict_resumes_each_phase_on_a_fresh_base(base, tmp_path, selection):
    """A checkpoint (through safetensors, which reorders keys) continues a phase on a reloaded base exactly."""
    from xlpeft.models import load_base

    cfg = TrainConfig(lr=1e-2, max_steps=4, log_every=100)
    sft_cfg = SFTConfig(num_params=300, selection=selection)
    fresh = load_base(str(base.path))

    def through_disk(state):
        save_file(state, str(tmp_path / "state.safetensors"))
        return load_file(str(tmp_path / "state.safetensors"))

    a, b = SFTTrainable(base, sft_cfg, cfg), SFTTrainable(fresh, sft_cfg, cfg)
    full, sparse = a.phases
    _train(base, a, TrainConfig(lr=1e-2, max_steps=2), phases=[full])  # phase 1 under way
    params = b.resume_phase(full, through_disk(a.state_dict()))
    assert [tuple(p.shape) for p in params] == [tuple(p.shape) for p in a.params.values()]
    assert all(torch.equal(b.params[n], p) for n, p in a.params.items())
    if selection == "movement":
        assert all(torch.equal(b._movement.scores[n], s) for n, s in a._movement.scores.items())
    a.end_phase(full)
    b.end_phase(full)
    assert a.indices.keys() == b.indices.keys() and all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices)

    c = SFTTrainable(load_base(str(base.path)), sft_cfg, cfg)
    _train(base, a, TrainConfig(lr=1e-2, max_steps=2), phases=[sparse])  # phase 2 under way
    values = c.resume_phase(sparse, through_disk(a.state_dict()))
    assert [v.numel() for v in values] == [v.numel() for v in a.values.values()]  # same order for the optimizer
    assert all(torch.equal(c.values[n], v) for n, v in a.values.items())
    assert all(torch.equal(c.params[n], p) for n, p in a.params.items())  # theta0 + delta in place, bit for bit
    for t in (a, b, c):
        t.close()


def test_close_during_phase1_restores_base(base):
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    trainable = SFTTrainable(base, SFTConfig(num_params=10, selection="movement"), TrainConfig(max_steps=4))
    for p in trainable.begin_phase(trainable.phases[0]):
        with torch.no_grad():
            p.add_(1.0)
    trainable.close()
    assert all(torch.equal(p, before[n]) and not p.requires_grad for n, p in base.model.named_parameters())


def test_no_hook_left_after_close(base):
    trainable = SFTTrainable(base, SFTConfig(num_params=10, selection="random"), TrainConfig(max_steps=2))
    trainable.begin_phase(trainable.phases[0])
    trainable.close()
    p = trainable.params[next(iter(trainable.indices))]
    p.requires_grad_(True)
    mlm_loss(base, *mask_tokens(_ids(base), base.tokenizer, 0.5, torch.Generator().manual_seed(0))).backward()
    assert p.grad is not None, "a gather hook is still attached"
    p.grad = None
    p.requires_grad_(False)


# ---- the SparseDelta value
def _delta(base, n: int, seed: int) -> SparseDelta:
    g = torch.Generator().manual_seed(seed)
    entries = {}
    for name, p in list(maskable_parameters(base, SFTConfig()).items())[:4]:
        idx = torch.sort(torch.randperm(p.numel(), generator=g)[:n]).values
        entries[name] = (idx, torch.randn(len(idx), generator=g))
    return SparseDelta(entries)


def _weights(base) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in base.model.named_parameters(remove_duplicate=False)}


def _assert_bit_identical(base, before: dict[str, torch.Tensor]) -> None:
    for name, p in base.model.named_parameters(remove_duplicate=False):
        assert torch.equal(p, before[name]), name  # exact: revert restores, it does not subtract


def test_revert_apply_is_identity_and_apply_changes_output(base):
    before = _weights(base)
    ids = _ids(base)
    with torch.no_grad():
        ref = base.model(input_ids=ids).logits
    delta = _delta(base, 30, seed=0)  # values ~N(0, 1) on weights ~N(0, 0.02): subtracting them back rounds
    delta.apply(base.model)
    with torch.no_grad():
        changed = base.model(input_ids=ids).logits
    delta.revert(base.model)
    assert not torch.allclose(changed, ref, atol=1e-4)
    _assert_bit_identical(base, before)
    with pytest.raises(XlpeftError, match="not applied"):
        delta.revert(base.model)  # once only


def test_applied_sft_remove_is_bit_exact(base):
    from xlpeft.methods.sft import AppliedSFT

    before = _weights(base)
    handle = AppliedSFT(_delta(base, 30, seed=5), base.model, freeze_decoder=False)
    handle.remove()
    handle.remove()  # a second remove does nothing
    _assert_bit_identical(base, before)


@pytest.mark.parametrize("order", ["reverse", "same"])
def test_two_overlapping_deltas_revert_exactly_in_either_order(base, order):
    before = _weights(base)
    a, b = _delta(base, 40, seed=1), _delta(base, 40, seed=2)
    assert any(a.overlap(b).values())  # shared entries: the hard case
    a.apply(base.model)
    only_a = _weights(base)
    b.apply(base.model)
    if order == "reverse":
        b.revert(base.model)
        _assert_bit_identical(base, only_a)
        a.revert(base.model)
    else:  # a first: what is left is exactly b applied alone
        a.revert(base.model)
        left = _weights(base)
        b.revert(base.model)
        _assert_bit_identical(base, before)
        b.apply(base.model)
        _assert_bit_identical(base, left)
        b.revert(base.model)
    _assert_bit_identical(base, before)


def test_overlapping_deltas_sum(base):
    first, second = list(maskable_parameters(base, SFTConfig()))[:2]
    a = SparseDelta({first: (torch.tensor([0, 3, 5]), torch.tensor([1.0, 1.0, 1.0]))})
    b = SparseDelta({first: (torch.tensor([5, 0, 9]), torch.tensor([2.0, 2.0, 2.0])),
                     second: (torch.tensor([1]), torch.tensor([4.0]))})
    assert a.overlap(b) == {first: 2} and b.overlap(a) == {first: 2}
    total = sum([a, b])
    assert total.entries[first][0].tolist() == [0, 3, 5, 9]
    assert total.entries[first][1].tolist() == [3.0, 1.0, 3.0, 2.0]
    assert total.num_params == 5
    before = _weights(base)
    total.apply(base.model)
    summed = _weights(base)
    total.revert(base.model)
    a.apply(base.model)
    b.apply(base.model)
    for n, p in base.model.named_parameters(remove_duplicate=False):
        torch.testing.assert_close(p, summed[n], rtol=0, atol=1e-6)
    assert float(summed[first].view(-1)[0] - before[first].view(-1)[0]) == pytest.approx(3.0)
    a.revert(base.model)
    b.revert(base.model)
    _assert_bit_identical(base, before)


def test_to_tensors_round_trips_through_safetensors(tmp_path, base):
    delta = _delta(base, 15, seed=3)
    tensors = delta.to_tensors()
    assert all(k.endswith((".indices", ".values")) for k in tensors)
    assert all(t.dim() == 1 for t in tensors.values())
    save_file(tensors, str(tmp_path / "delta.safetensors"))
    back = SparseDelta.from_tensors(load_file(str(tmp_path / "delta.safetensors")))
    for name, (idx, vals) in delta.entries.items():
        assert torch.equal(back.entries[name][0], idx) and torch.equal(back.entries[name][1], vals)


def test_apply_validates_before_changing_anything(base):
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    good = _delta(base, 5, seed=4)
    name = next(iter(good.entries))
    numel = dict(base.model.named_parameters(remove_duplicate=False))[name].numel()
    with pytest.raises(XlpeftError, match="no parameter 'missing.weight'"):
        SparseDelta({**good.entries, "missing.weight": (torch.tensor([0]), torch.tensor([1.0]))}).apply(base.model)
    with pytest.raises(XlpeftError, match=rf"indices span \[0, {numel}\] but it has {numel} entries"):
        SparseDelta({**good.entries, name: (torch.tensor([0, numel]), torch.ones(2))}).apply(base.model)
    assert all(torch.equal(p, before[n]) for n, p in base.model.named_parameters())
    with pytest.raises(XlpeftError, match="indices should be int64"):
        SparseDelta({name: (torch.tensor([0], dtype=torch.int32), torch.ones(1))})
    with pytest.raises(XlpeftError, match="values should be floating point"):
        SparseDelta({name: (torch.tensor([0]), torch.tensor([1]))})
    with pytest.raises(XlpeftError, match="should end in .indices or .values"):
        SparseDelta.from_tensors({f"{name}.idx": torch.tensor([0])})
    with pytest.raises(XlpeftError, match="indices without values"):
        SparseDelta.from_tensors({f"{name}.indices": torch.tensor([0])})


# ---- configuration
def test_default_k_is_lt_sft_on_base_size_models_and_scales_down():
    from transformers import BertConfig, BertForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM

    with torch.device("meta"):  # shapes only, no memory
        mbert = BertForMaskedLM(BertConfig(vocab_size=119547))
        xlmr = XLMRobertaForMaskedLM(XLMRobertaConfig(vocab_size=250002, max_position_embeddings=514, type_vocab_size=1))
    for model in (mbert.bert, xlmr.roberta):
        layers = sum(p.numel() for p in model.encoder.layer.parameters())
        assert layers == MBERT_BASE_LAYER_PARAMS
        assert default_num_params(7_667_712, layers) == 7_667_712
        assert default_num_params(14_155_776, layers) == 14_155_776
    assert default_num_params(7_600_000, MBERT_BASE_LAYER_PARAMS // 100) == 76_000
    # composable-sft's released scripts: --ft_params_num 7667712 (train_mlm.sh), 14155776 (train_ner.sh, train_pos_tagging.sh)
    assert SFTConfig().reference_num_params == 7_667_712
    assert SFTConfig(**SFTConfig.defaults_for("language")).reference_num_params == 7_667_712
    assert SFTConfig(**SFTConfig.defaults_for("task")).reference_num_params == 14_155_776


def test_default_k_on_tiny_model(base):
    trainable = SFTTrainable(base, SFTConfig(), TrainConfig(max_steps=2))
    layers = sum(p.numel() for p in base.layers.parameters())
    assert trainable.num_params == round(7_667_712 * layers / MBERT_BASE_LAYER_PARAMS)
    trainable.close()
    with pytest.raises(XlpeftError, match="maskable entries"):
        SFTTrainable(base, SFTConfig(num_params=10**9), TrainConfig(max_steps=2))


@pytest.mark.parametrize(
    "sets, max_steps, expected",
    [
        ({}, 20, (10, 10)), ({}, 7, (3, 4)), ({"full_steps": 5}, 20, (5, 15)), ({"sparse_steps": 4}, 20, (16, 4)),
        ({"full_steps": 3, "sparse_steps": 4}, 1000, (3, 4)), ({"selection": "random"}, 20, (0, 20)),
        ({"selection": "bias", "full_steps": 2}, 20, (2, 18)),
    ],
)
def test_split_steps(sets, max_steps, expected):
    assert split_steps(SFTConfig(**sets), max_steps) == expected


def test_config_errors_name_field_and_value():
    with pytest.raises(ConfigError, match=r"selection.*magnitude, movement, fisher, diff_pruning, random, bias.*'lottery'"):
        SFTConfig(selection="lottery")
    with pytest.raises(ConfigError, match=r"num_params.*>= 1.*0"):
        SFTConfig(num_params=0)
    with pytest.raises(ConfigError, match=r"l1.*-0.5"):
        SFTConfig(l1=-0.5)
    with pytest.raises(ConfigError, match="full_steps.*>= 1; got 0"):
        SFTConfig(selection="movement", full_steps=0)
    with pytest.raises(ConfigError, match="cannot split --max-steps 1"):
        split_steps(SFTConfig(), 1)
    with pytest.raises(ConfigError, match="cannot split --max-steps 10"):
        split_steps(SFTConfig(full_steps=10), 10)


def test_peak_memory_sees_an_allocation():
    meter = PeakMemory("cpu", interval=0.001)
    meter.start()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page touched
    time.sleep(0.05)
    del big
    peak = meter.stop()
    assert peak * 2**20 >= rss_bytes() + 32 * 2**20
    assert PeakMemory("cpu").stop() == 0.0  # never started
