"""Parallel adapters and MAM (He et al. 2022): the formula, AdapterHub's par_bn / mam logits, init, stacking, errors."""

from __future__ import annotations

import math

import pytest
import torch

import xlpeft
from tests.interop.conftest import FIXTURES, TOLERANCE, base_dir, expected, max_diff
from xlpeft.config import build
from xlpeft.errors import ConfigError
from xlpeft.methods.adapters import attach_adapters
from xlpeft.methods.mam import MAMConfig, MAMModule, attach_mam
from xlpeft.methods.parallel import ParallelConfig, ParallelModule
from xlpeft.methods.prefix import SavedPrefixes


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_reads_the_ffn_input_and_adds_s_times_its_output(base):
    """LN(h + s * up(relu(down(x))) + x) with x the FFN's input (the residual), s = 4, at every layer's FFN only."""
    module = ParallelModule(ParallelConfig(), base.hidden_size, len(base.layers))
    assert all(set(block.keys()) == {"ffn"} for block in module.layers)
    _randomise(module, 1)
    sub = base.layers[1].get_submodule(base.arch.ffn_output)
    inner, x = torch.randn(2, 5, sub.dense.in_features), torch.randn(2, 5, base.hidden_size)
    block = module.layers[1]["ffn"]
    base.model.eval()
    with torch.no_grad():
        expected_out = sub.LayerNorm(sub.dense(inner) + 4.0 * block.up(torch.relu(block.down(x))) + x)
        hooks = attach_adapters(base.model, base.arch, [module])
        got = sub(inner, x)
        hooks.remove()
        bare = sub(inner, x)
    torch.testing.assert_close(got, expected_out, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, bare, atol=1e-3)


def test_two_parallel_adapters_each_add_their_own_term(base):
    """Stacked (language under task), both read x: LN(h + s1 A1(x) + s2 A2(x) + x)."""
    lower = ParallelModule(ParallelConfig(scaling=2.0), base.hidden_size, len(base.layers))
    upper = ParallelModule(ParallelConfig(reduction_factor=4, scaling=0.5, placement="both"), base.hidden_size,
                           len(base.layers))
    _randomise(lower, 2)
    _randomise(upper, 3)
    sub = base.layers[0].get_submodule(base.arch.ffn_output)
    inner, x = torch.randn(1, 4, sub.dense.in_features), torch.randn(1, 4, base.hidden_size)
    base.model.eval()
    with torch.no_grad():
        a1, a2 = lower.layers[0]["ffn"], upper.layers[0]["ffn"]
        expected_out = sub.LayerNorm(sub.dense(inner) + 2.0 * a1(x) + 0.5 * a2(x) + x)
        hooks = [attach_adapters(base.model, base.arch, [lower]), attach_adapters(base.model, base.arch, [upper])]
        got = sub(inner, x)
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(got, expected_out, rtol=1e-5, atol=1e-6)


def test_init_is_adapterhubs_mam_adapter_init():
    """Down: Kaiming-uniform (a = sqrt 5), bounded by 1/sqrt(fan_in); up and biases zero: the identity at init."""
    module = ParallelModule(ParallelConfig(), 64, 2)
    block = module.layers[0]["ffn"]
    bound = 1 / math.sqrt(64)
    assert block.down.weight.shape == (32, 64), "reduction factor 2"
    weight = block.down.weight.detach()
    assert float(weight.abs().max()) <= bound and float(weight.std()) > bound / 3
    assert not block.up.weight.any() and not block.up.bias.any() and not block.down.bias.any()


def _parallel_from_adapterhub(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AdapterHub names -> ours, by the table in parallel.py's docstring."""
    out = {}
    for key, tensor in weights.items():
        if ".adapters." not in key:
            continue
        head, _, tail = key.partition(".adapters.")
        layer = int(head.split("encoder.layer.")[1].split(".")[0])
        site = "attn" if head.endswith("attention.output") else "ffn"
        part, kind = tail.split(".", 1)[1].replace("adapter_down.0", "down").replace("adapter_up", "up").split(".")
        out[f"layers.{layer}.{site}.{part}.{kind}"] = tensor
    return out


def _weights(case: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "adapterhub" / case / "pytorch_adapter.bin", weights_only=True)


def test_adapterhub_par_bn_weights_give_adapterhubs_logits():
    base = xlpeft.load_base(base_dir("tiny-bert"))
    module = ParallelModule(ParallelConfig(), base.hidden_size, len(base.layers))  # par_bn's defaults
    module.load_state_dict(_parallel_from_adapterhub(_weights("par_bn")), strict=True)
    hooks = attach_adapters(base.model, base.arch, [module])
    diff = max_diff(base.model, expected("adapterhub", "par_bn"))
    hooks.remove()
    assert diff <= TOLERANCE, f"par_bn: max |logits - AdapterHub's| = {diff:.3g}"
    assert max_diff(base.model, expected("adapterhub", "par_bn")) > 1e-3, "the adapter changed the logits"


def test_adapterhub_mam_weights_give_adapterhubs_logits():
    """MAMConfig(): par_bn beside the FFN + a 30-vector prefix through AdapterHub's 800-wide MLP, run once into our layout."""
    base = xlpeft.load_base(base_dir("tiny-bert"))
    weights, hidden, layers = _weights("mam"), base.hidden_size, len(base.layers)
    pool = "bert.prefix_tuning.prefix_tunings.sw.self_prefix."
    with torch.no_grad():
        mlp = torch.tanh(weights[pool + "wte.weight"] @ weights[pool + "control_trans.0.weight"].T
                         + weights[pool + "control_trans.0.bias"])
        out = mlp @ weights[pool + "control_trans.2.weight"].T + weights[pool + "control_trans.2.bias"]  # (P, L*2*H)
    pairs = out.view(out.shape[0], layers, 2, hidden)  # layer i: columns [2iH, (2i+1)H) keys, then values
    prefixes = {"key": pairs[:, :, 0].transpose(0, 1).contiguous(), "value": pairs[:, :, 1].transpose(0, 1).contiguous()}
    config = MAMConfig()
    module = MAMModule(config, hidden, layers, SavedPrefixes(config.prefix_config(), prefixes))
    module.parallel.load_state_dict(_parallel_from_adapterhub(weights), strict=True)
    detach = attach_mam(base, module)
    exp = expected("adapterhub", "mam")
    diff = max_diff(base.model, exp)
    with torch.no_grad():  # the padded row alone, unpadded: the prefix columns of the mask are right
        alone = base.model.eval()(input_ids=exp["input_ids"][1:, :exp["row1_unpadded_logits"].shape[1]]).logits
    detach()
    assert diff <= TOLERANCE, f"mam: max |logits - AdapterHub's| = {diff:.3g}"
    torch.testing.assert_close(alone, exp["row1_unpadded_logits"], rtol=0, atol=TOLERANCE)
    assert max_diff(base.model, exp) > 1e-3, "the module changed the logits"


def test_mam_is_one_module_applied_and_removed_together(base):
    ids = torch.randint(5, len(base.tokenizer), (2, 7), generator=torch.Generator().manual_seed(0))
    base.model.eval()
    with torch.no_grad():
        ref = base.model(input_ids=ids).logits
        module = MAMModule(MAMConfig(prefix_length=3, width=16), base.hidden_size, len(base.layers))
        detach = attach_mam(base, module)
        with_both = base.model(input_ids=ids).logits
        module.drop_below = len(base.layers)  # AdapterDrop everywhere: the prefixes alone remain
        prefixes_only = base.model(input_ids=ids).logits
        module.drop_below = 0
        _randomise(module.parallel, 5)
        with_adapter = base.model(input_ids=ids).logits
        detach()
        detach()
        after = base.model(input_ids=ids).logits
    assert not torch.allclose(with_both, ref, atol=1e-4), "prefixes act from init (identity_at_init=False)"
    assert torch.equal(prefixes_only, with_both), "its parallel adapter starts as the identity"
    assert not torch.allclose(with_adapter, with_both, atol=1e-4)
    assert torch.equal(after, ref)
    saved = module.export()
    assert set(saved) == {"parallel", "prefix"} and set(saved["prefix"]) == {"key", "value"}
    assert saved["prefix"]["key"].shape == (len(base.layers), 3, base.hidden_size), "the MLP is dropped at export"


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"scaling.*> 0.*0.0"):
        build(ParallelConfig, {"scaling": "0"})
    with pytest.raises(ConfigError, match=r"scaling.*> 0.*-1"):
        MAMConfig(scaling=-1.0)
    with pytest.raises(ConfigError, match=r"placement.*ffn, attn, both"):
        ParallelConfig(placement="pfeiffer")
    with pytest.raises(ConfigError, match=r"prefix_length.*>= 1"):
        build(MAMConfig, {"prefix_length": "0"})
    with pytest.raises(ConfigError, match=r"reduction_factor.*> 0"):
        ParallelConfig(reduction_factor=0.0)
