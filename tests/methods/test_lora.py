"""LoRA / DoRA against the math written out by hand: merged weights, Sum with sft deltas, unmerged hooks, errors.

The method contract (identity at init, bit-exact removal in any order, save/load, resume, composition)
is ``tests/methods/test_contract.py``; peft equivalence is ``tests/interop/test_peft.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from xlpeft.config import TrainConfig
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.io import Manifest, load_module, save_module
from xlpeft.methods.lora import LoraConfig, apply_lora, lora_overlap, prepare_lora, resolve_targets
from xlpeft.methods.sft.delta import SparseDelta
from xlpeft.models import load_base
from xlpeft.recipes.common import resolve_configs

QUERY0 = "bert.encoder.layer.0.attention.self.query.weight"


@pytest.fixture
def bert(base_dirs):
    return load_base(str(base_dirs["tiny-bert"]))


def make_module(base, tmp_path, cfg: LoraConfig, seed: int = 0, name: str = "m"):
    """A LoRA module with random B != 0 (and DoRA magnitudes != their init), saved as the recipes save one."""
    trainable = prepare_lora(base, cfg, TrainConfig())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in trainable.module.named_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen) if "lora" in pname
                    else p * (1 + 0.2 * torch.randn(p.shape, generator=gen)))
    tensors, _ = trainable.export()
    trainable.close()
    manifest = Manifest(kind="language", method="lora", config=dataclasses.asdict(cfg), lang="sw",
                        base={"name": base.name, "fingerprint": base.fingerprint, "model_type": "bert"})
    return load_module(save_module(tmp_path / name, manifest, tensors))


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def logits(base, ids):
    with torch.no_grad():
        return base.model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("sets, named", [
    ({"r": "0"}, "`r` should be >= 1; got 0"),
    ({"alpha": "0"}, "`alpha` should be > 0.0; got 0.0"),
    ({"alpha": "-2"}, "`alpha` should be > 0.0"),
    ({"dropout": "1"}, "`dropout` should be in [0, 1); got 1.0"),
    ({"dropout": "-0.1"}, "`dropout` should be in [0, 1)"),
    ({"target_modules": "query,qkv"}, "entry 'qkv' matches no site"),
    ({"layers": "3-1"}, "`layers` should be comma-separated"),
    ({"r": "eight"}, "`r` should be an int; got 'eight'"),
])
def test_bad_settings_are_one_line_errors(sets, named):
    with pytest.raises(ConfigError) as info:
        resolve_configs("lora", "language", sets)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_layers_beyond_the_base_are_refused_when_prepared(bert):
    with pytest.raises(XlpeftError, match=r"names layer 5 but this base has 2 \(0-1\)"):
        prepare_lora(bert, LoraConfig(layers="1,5"), TrainConfig())


def test_merged_weights_are_w0_plus_scaled_ba_and_unmerged_hooks_agree(bert, tmp_path):
    cfg = LoraConfig(r=3, alpha=7.0, target_modules="query,*_output", layers="0")
    module = make_module(bert, tmp_path, cfg)
    state, before = module.tensors["lora"], weights(bert.model)
    ids = torch.randint(5, len(bert.tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    handle = apply_lora(bert, module)
    after = weights(bert.model)
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed == ["bert.encoder.layer.0.attention.output.dense.weight", QUERY0,
                       "bert.encoder.layer.0.output.dense.weight"], "only the targets' weights, in layer 0"
    a, b = state["layers.0.query.lora_A"], state["layers.0.query.lora_B"]
    assert torch.equal(after[QUERY0], before[QUERY0] + (7.0 / 3) * (b @ a)), "θ0 + (alpha/r)·B·A"
    assert handle.saved_tensors() == {} and handle.modules() == [], "merged: the weights hold it"
    merged = logits(bert, ids)
    handle.remove()
    assert all(torch.equal(before[n], p) for n, p in weights(bert.model).items())
    hooked = apply_lora(bert, module, merge=False)
    assert all(torch.equal(before[n], p) for n, p in weights(bert.model).items()), "unmerged: weights untouched"
    assert set(hooked.saved_tensors()["lora"]) == set(state) and len(hooked.modules()) == 1
    torch.testing.assert_close(logits(bert, ids), merged, rtol=0, atol=1e-5)
    hooked.remove()


def test_dora_merged_weight_is_magnitude_times_direction(bert, tmp_path):
    module = make_module(bert, tmp_path, LoraConfig(r=2, alpha=4.0, use_dora=True, target_modules="query"))
    state, w0 = module.tensors["lora"], bert.model.get_parameter(QUERY0).detach().clone()
    a, b, m = state["layers.0.query.lora_A"], state["layers.0.query.lora_B"], state["layers.0.query.magnitude"]
    direction = w0 + 2.0 * (b @ a)  # (out, in)
    expected = m[:, None] * direction / direction.norm(dim=1, keepdim=True)
    ids = torch.randint(5, len(bert.tokenizer), (2, 9), generator=torch.Generator().manual_seed(2))
    handle = apply_lora(bert, module)
    torch.testing.assert_close(bert.model.get_parameter(QUERY0), expected, rtol=0, atol=1e-6)
    merged = logits(bert, ids)
    handle.remove()
    assert torch.equal(bert.model.get_parameter(QUERY0), w0)
    hooked = apply_lora(bert, module, merge=False)
    torch.testing.assert_close(logits(bert, ids), merged, rtol=0, atol=1e-5)
    hooked.remove()


def test_a_sum_with_an_sft_delta_and_another_lora_is_theta0_plus_both(bert, tmp_path):
    """θ0 + δ_sft + B1·A1 + B2·A2 on a shared weight; removing the lowest first leaves exactly the others."""
    w0 = bert.model.get_parameter(QUERY0).detach().clone()
    idx = torch.tensor([0, 5, 33, 100, 1000], dtype=torch.long)
    delta = SparseDelta({QUERY0: (idx, torch.randn(5, generator=torch.Generator().manual_seed(3)))})
    one = make_module(bert, tmp_path, LoraConfig(r=2, alpha=2.0, target_modules="query"), seed=1, name="one")
    two = make_module(bert, tmp_path, LoraConfig(r=4, alpha=8.0, target_modules="query,value"), seed=2, name="two")

    def ba(module, r_alpha):
        s = module.tensors["lora"]
        return r_alpha * (s["layers.0.query.lora_B"] @ s["layers.0.query.lora_A"])

    delta.apply(bert.model)
    h1, h2 = apply_lora(bert, one), apply_lora(bert, two)
    with_sft = w0.clone().view(-1).index_add_(0, idx, delta.entries[QUERY0][1]).view_as(w0)
    assert torch.equal(bert.model.get_parameter(QUERY0), with_sft + ba(one, 1.0) + ba(two, 2.0))
    counts = lora_overlap(one, two)
    assert counts == {"layer_00": 1, "layer_01": 1}, "query in both layers is shared; value only in two"
    delta.revert(bert.model)  # out of order: the two LoRAs are taken off and put back on θ0
    assert torch.equal(bert.model.get_parameter(QUERY0), w0 + ba(one, 1.0) + ba(two, 2.0))
    h1.remove()
    assert torch.equal(bert.model.get_parameter(QUERY0), w0 + ba(two, 2.0))
    h2.remove()
    assert torch.equal(bert.model.get_parameter(QUERY0), w0)


def test_all_linear_covers_the_layers_and_never_the_heads(bert):
    targets = resolve_targets(bert, LoraConfig(target_modules="all-linear"))
    names = [name for sites in targets.values() for name, _ in sites.values()]
    layer_linears = [n for n, m in bert.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n]
    assert sorted(names) == sorted(layer_linears) and len(names) == 12
    assert not any(n.startswith(bert.arch.mlm_head) for n in names)


def test_dropout_acts_in_training_only(bert):
    trainable = prepare_lora(bert, LoraConfig(dropout=0.5), TrainConfig())
    with torch.no_grad():
        for p in trainable.module.parameters():
            p.copy_(torch.randn_like(p))
    ids = torch.randint(5, len(bert.tokenizer), (1, 8), generator=torch.Generator().manual_seed(4))
    bert.model.eval()  # the base's own dropout off: only the LoRA branch's acts
    trainable.module.train()
    with torch.no_grad():
        first, second = bert.encoder(input_ids=ids).last_hidden_state, bert.encoder(input_ids=ids).last_hidden_state
    assert not torch.equal(first, second)
    trainable.module.eval()
    with torch.no_grad():
        assert torch.equal(bert.encoder(input_ids=ids).last_hidden_state, bert.encoder(input_ids=ids).last_hidden_state)
    trainable.close()
