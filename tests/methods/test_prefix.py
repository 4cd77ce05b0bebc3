"""Prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021): the math, masks, composition, export.

The generic contract (identity-at-init says no, apply/remove bit-exact, save/load, resume, composing
under every method) is ``tests/methods/test_contract.py``; peft equivalence is
``tests/interop/test_peft_prefix.py``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.methods.prefix import PrefixConfig, PrefixEncoder, SavedPrefixes, attach_prefix, extend_mask
from xlpeft.models import arch_for, load_base
from xlpeft.recipes.common import resolve_configs

P = 3


def saved(base, layers: str = "all", seed: int = 0, p: int = P, **cfg) -> SavedPrefixes:
    """A frozen source with non-trivial values (N(0, 1)), in the saved layout."""
    g = torch.Generator().manual_seed(seed)
    h, n = base.hidden_size, len(base.layers)
    state = ({"prompt": torch.randn(p, h, generator=g)} if layers == "input" else
             {"key": torch.randn(n, p, h, generator=g), "value": torch.randn(n, p, h, generator=g)})
    return SavedPrefixes(PrefixConfig(prefix_length=p, layers=layers, **cfg), state)


def padded_batch(model, lengths=(8, 5), seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids with the shorter rows right-padded with the pad id, and their 0/1 mask."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(5, model.config.vocab_size, (len(lengths), t), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = model.config.pad_token_id
    return ids, mask


@torch.no_grad()
def logits(model, ids, mask=None, **kw) -> torch.Tensor:
    return model.eval()(input_ids=ids, attention_mask=mask, **kw).logits


def test_extend_mask_every_form():
    assert extend_mask(None, 4) is None
    two = torch.tensor([[1, 1, 0]])
    assert extend_mask(two, 2).tolist() == [[1, 1, 1, 1, 0]]
    additive = torch.tensor([0.0, 0.0, torch.finfo(torch.float32).min]).view(1, 1, 1, 3).expand(1, 1, 3, 3)
    out = extend_mask(additive, 2)
    assert out.shape == (1, 1, 3, 5) and out.dtype == torch.float32
    assert torch.equal(out[..., :2], torch.zeros(1, 1, 3, 2)) and torch.equal(out[..., 2:], additive)
    boolean = additive == 0
    out = extend_mask(boolean, 2)
    assert out.dtype == torch.bool and bool(out[..., :2].all()) and torch.equal(out[..., 2:], boolean)


@pytest.mark.parametrize("impl, mask_kind", [("eager", "float"), ("sdpa", "float"), ("sdpa", "bool"), ("eager", None)])
def test_self_attention_equals_the_math_written_out(base_dirs, impl, mask_kind):
    """softmax(q [K_p; K]^T / sqrt(d) + [0; mask]) [V_p; V] per head (Li & Liang 2021, eq. in §4.2), padding masked."""
    base = load_base(str(base_dirs["tiny-bert"]))
    base.model.config._attn_implementation = impl
    attn = base.layers[0].get_submodule(base.arch.self_attention).eval()
    source = saved(base)
    b, t, h, nh = 2, 5, base.hidden_size, attn.num_attention_heads
    d = h // nh
    hidden = torch.randn(b, t, h, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(b, t, dtype=torch.bool)
    keep[1, 3:] = False
    additive = torch.zeros(b, 1, t, t).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    mask = {"float": additive, "bool": keep[:, None, None, :].expand(b, 1, t, t), None: None}[mask_kind]
    handle = attach_prefix(base.model, base.arch, source)
    with torch.no_grad():
        got = attn(hidden, attention_mask=mask)[0]  # (B, T, H)
    handle.remove()

    def heads(x):  # (B, n, H) -> (B, nh, n, d)
        return x.view(x.shape[0], -1, nh, d).transpose(1, 2)
    kp, vp = (x.unsqueeze(0).expand(b, -1, -1) for x in source.layer(0))  # (B, P, H)
    with torch.no_grad():
        q = heads(attn.query(hidden))
        k = torch.cat([heads(kp), heads(attn.key(hidden))], dim=2)  # (B, nh, P + T, d)
        v = torch.cat([heads(vp), heads(attn.value(hidden))], dim=2)
        scores = q @ k.transpose(-1, -2) / d ** 0.5  # (B, nh, T, P + T)
        if mask is not None:
            scores = scores + torch.cat([torch.zeros(b, 1, t, P), additive], dim=-1)
        expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch, layers, impl", [  # each architecture x kind once, each attention implementation twice
    ("tiny-bert", "all", "eager"), ("tiny-bert", "input", "sdpa"), ("tiny-xlmr", "all", "sdpa"),
    ("tiny-xlmr", "input", "eager")])
def test_padded_rows_equal_the_row_alone(base_dirs, arch, layers, impl):
    """Padding stays masked and the prefixes stay visible: a padded row's real positions equal the row run alone."""
    base = load_base(str(base_dirs[arch]))
    base.model.config._attn_implementation = impl
    ids, mask = padded_batch(base.model)
    ref = logits(base.model, ids, mask)
    handle = attach_prefix(base.model, base.arch, saved(base, layers))
    batch = logits(base.model, ids, mask)
    alone = logits(base.model, ids[1:, :5], mask[1:, :5])
    handle.remove()
    assert batch.shape == ref.shape, "the virtual positions are stripped: T outputs per row"
    torch.testing.assert_close(batch[1:, :5], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(batch, ref, atol=1e-3), "the prefixes are attended to"
    assert torch.equal(logits(base.model, ids, mask), ref), "removed: the base's logits exactly"


@pytest.mark.parametrize("layers", ["all", "input"])
def test_two_modules_concatenate_bottom_first_and_remove_in_any_order(base_dirs, layers):
    base = load_base(str(base_dirs["tiny-bert"]))
    ids, mask = padded_batch(base.model)
    ref = logits(base.model, ids, mask)
    lang, task = saved(base, layers, seed=1), saved(base, layers, seed=2, p=2)

    def joined(lower, upper):
        state = {k: torch.cat([v, upper.state_dict()[k]], dim=-2) for k, v in lower.state_dict().items()}
        return SavedPrefixes(PrefixConfig(prefix_length=5, layers=layers), state)

    def alone(source):
        handle = attach_prefix(base.model, base.arch, source)
        out = logits(base.model, ids, mask)
        handle.remove()
        return out

    in_order, reversed_order, task_alone = alone(joined(lang, task)), alone(joined(task, lang)), alone(task)
    below = attach_prefix(base.model, base.arch, lang)
    above = attach_prefix(base.model, base.arch, task)
    both = logits(base.model, ids, mask)
    torch.testing.assert_close(both, in_order, rtol=0, atol=1e-5)
    if layers == "input":  # prompts have positions: the order is visible
        # (the tiny base's position embeddings are small, so the order moves logits by ~1e-4, far above rounding)
        swapped, same = (both - reversed_order).abs().max(), (both - in_order).abs().max()
        assert swapped > 1e-5 and swapped > 100 * same, f"[lang; task], not [task; lang]: {swapped} vs {same}"
    below.remove()
    torch.testing.assert_close(logits(base.model, ids, mask), task_alone, rtol=0, atol=0)
    above.remove()
    assert torch.equal(logits(base.model, ids, mask), ref)


def test_prompt_tuning_is_a_prefix_of_the_input_embeddings(base_dirs):
    """layers=input: the model run on [prompts; word embeddings] with the mask widened, virtual positions cut."""
    base = load_base(str(base_dirs["tiny-xlmr"]))
    ids, mask = padded_batch(base.model)
    source = saved(base, "input")
    with torch.no_grad():
        embeds = torch.cat([source.prompts().expand(2, -1, -1), base.model.get_input_embeddings()(ids)], dim=1)
        expected = base.model.eval()(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, P), mask], 1)).logits
    handle = attach_prefix(base.model, base.arch, source)
    got = logits(base.model, ids, mask)
    handle.remove()
    assert got.shape == ids.shape + (base.model.config.vocab_size,)
    torch.testing.assert_close(got, expected[:, P:], rtol=0, atol=1e-6)


def test_shift_positions_numbers_the_tokens_from_p(base_dirs):
    """shift_positions=true (peft's route) equals explicit position ids P..P+T-1; false leaves them at 0..T-1."""
    base = load_base(str(base_dirs["tiny-bert"]))
    ids, mask = padded_batch(base.model)
    kv = saved(base).state_dict()
    shifted = SavedPrefixes(PrefixConfig(prefix_length=P, shift_positions=True), kv)
    handle = attach_prefix(base.model, base.arch, saved(base))
    kept = logits(base.model, ids, mask)
    moved = logits(base.model, ids, mask, position_ids=torch.arange(P, P + ids.shape[1]).expand_as(ids))
    handle.remove()
    handle = attach_prefix(base.model, base.arch, shifted)
    torch.testing.assert_close(logits(base.model, ids, mask), moved, rtol=0, atol=1e-6)
    assert not torch.allclose(moved, kept, atol=1e-3)
    too_long = torch.randint(5, 50, (1, base.model.config.max_position_embeddings - 1))
    with pytest.raises(XlpeftError, match="lower max_seq_len"):
        logits(base.model, too_long)
    handle.remove()


@pytest.mark.parametrize("reparameterise", [True, False])
def test_export_runs_the_mlp_once_and_drops_it(base_dirs, reparameterise):
    base = load_base(str(base_dirs["tiny-bert"]))
    cfg = PrefixConfig(prefix_length=P, width=8, reparameterise=reparameterise)
    enc = PrefixEncoder(cfg, base.hidden_size, len(base.layers))
    h, n = base.hidden_size, len(base.layers)
    with torch.no_grad():
        if reparameterise:
            first, last = enc.mlp[0], enc.mlp[2]  # E -> Linear(H, width) -> tanh -> Linear(width, L*2*H)
            full = torch.tanh(enc.embedding.weight @ first.weight.T + first.bias) @ last.weight.T + last.bias
        else:
            full = enc.embedding.weight  # (P, L*2*H): the prefixes themselves
    out = enc.export()
    assert set(out) == {"key", "value"} and out["key"].shape == (n, P, h)
    per_layer = full.view(P, n, 2, h)  # peft's column layout: layer i's key then value
    torch.testing.assert_close(out["key"], per_layer[:, :, 0].transpose(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out["value"], per_layer[:, :, 1].transpose(0, 1), rtol=0, atol=1e-6)
    assert (enc.mlp is not None) == reparameterise


def test_reparameterise_follows_layers():
    assert PrefixConfig().reparameterise is True and PrefixConfig(layers="input").reparameterise is False
    assert (PrefixConfig().prefix_length, PrefixConfig().width) == (30, 512), "Li & Liang / He et al. defaults"


@pytest.mark.parametrize("cls", [AutoModelForSequenceClassification, AutoModelForTokenClassification])
@pytest.mark.parametrize("layers", ["all", "input"])
def test_task_models_padded_and_restored(base_dirs, cls, layers):
    model = cls.from_pretrained(str(base_dirs["tiny-xlmr"]), num_labels=3).eval()
    arch = arch_for(model)
    ids, mask = padded_batch(model)
    ref = logits(model, ids, mask)
    base = load_base(str(base_dirs["tiny-xlmr"]))
    handle = attach_prefix(model, arch, saved(base, layers))
    batch, alone = logits(model, ids, mask), logits(model, ids[1:, :5], mask[1:, :5])
    handle.remove()
    assert batch.shape == ref.shape
    torch.testing.assert_close(batch[1:, :5] if batch.dim() == 3 else batch[1:], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(batch, ref, atol=1e-4)
    assert torch.equal(logits(model, ids, mask), ref)


@pytest.mark.parametrize("key, value, needle", [
    ("prefix_length", 0, "`prefix_length` should be >= 1; got 0"),
    ("width", 0, "`width` should be >= 1; got 0"),
    ("layers", "middle", "`layers` should be one of all, input; got 'middle'"),
])
def test_bad_settings_are_one_line_errors(key, value, needle):
    with pytest.raises(ConfigError) as info:
        resolve_configs("prefix", "language", {key: value})
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_shift_positions_with_prompts_is_refused():
    with pytest.raises(ConfigError, match="layers=all only"):
        PrefixConfig(layers="input", shift_positions=True)


@pytest.mark.parametrize("layers", ["all", "input"])
def test_trained_through_the_protocol_saved_and_applied(base_dirs, tmp_path, layers):
    """Prompt tuning is a config choice of the same method: train 2 steps, export (no MLP), apply: the same logits."""
    from tests.methods.test_contract import Batches, make_loss, save
    from xlpeft.io import load_module
    from xlpeft.registry import get_method

    spec, base = get_method("prefix"), load_base(str(base_dirs["tiny-bert"]))
    cfg, train_cfg = resolve_configs("prefix", "language", {"layers": layers, "prefix_length": 2, "width": 8,
                                                            "max_steps": 2, "batch_size": 4, "max_seq_len": 16})
    trainable = spec.prepare(base, cfg, train_cfg)
    params = trainable.begin_phase(trainable.phases[0])
    opt, data, loss = torch.optim.Adam(params, lr=1e-2), Batches(base, 0), make_loss(base, "language", None, 0)
    for _ in range(2):
        opt.zero_grad()
        loss(next(data)).backward()
        opt.step()
    ids, mask = padded_batch(base.model)
    trained = logits(base.model, ids, mask)
    tensors, extra = trainable.export()
    trainable.close()
    assert set(tensors["prefix"]) == ({"prompt"} if layers == "input" else {"key", "value"}), "the MLP is dropped"
    other = load_base(str(base_dirs["tiny-bert"]))
    handle = spec.apply(other, load_module(save(base, "prefix", "language", cfg, tensors, extra, None, tmp_path)))
    torch.testing.assert_close(logits(other.model, ids, mask), trained, rtol=0, atol=1e-6)
    handle.remove()
