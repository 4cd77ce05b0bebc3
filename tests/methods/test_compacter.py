"""Compacter: PHM weights as sums of Kronecker products, the placements, AdapterHub's logits, identity at init, errors."""

from __future__ import annotations

import pytest
import torch

import xlpeft
from tests.interop.conftest import FIXTURES, TOLERANCE, base_dir, expected, max_diff
from xlpeft.config import build
from xlpeft.errors import ConfigError
from xlpeft.methods.adapters import AdapterConfig, AdapterModule, attach_adapters
from xlpeft.methods.compacter import CompacterConfig, CompacterModule, PHMLinear


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("factorized", [True, False])
@pytest.mark.parametrize("rank", [1, 3])
def test_phm_weight_is_a_sum_of_kronecker_products(factorized, rank):
    """W = sum_i A_i ⊗ B_i (Eq. 3 of Karimi Mahabadi et al. 2021), B_i = s_i t_i^T when factorised; y = x W + b."""
    config = CompacterConfig(phm_dim=4, phm_rank=rank, factorized_phm=factorized, shared_phm_rule=False)
    layer = PHMLinear(16, 8, config, zero=False)
    _randomise(layer, 1)
    rule = layer.phm_rule  # (4, 4, 4)
    fast = [layer.W_left[i] @ layer.W_right[i] for i in range(4)] if factorized else list(layer.W)
    by_hand = sum(torch.kron(rule[i], fast[i]) for i in range(4))  # (16, 8)
    torch.testing.assert_close(layer.weight(None), by_hand, rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x, None), x @ by_hand + layer.b, rtol=1e-5, atol=1e-6)


def test_parameter_count_is_the_papers():
    """Shared rule n^3 + per projection n (in/n + out/n) r + bias: Compacter's O(k + d) per layer (its Table 1)."""
    config = CompacterConfig(reduction_factor=4)  # hidden 32 -> bottleneck 8
    module = CompacterModule(config, 32, 2)
    n, r = 4, 1
    per_projection = n * (32 // n) * r + n * r * (8 // n)
    expected_count = n ** 3 + 2 * 2 * (2 * per_projection + 8 + 32)  # 2 layers x 2 sites x (down + up)
    assert sum(p.numel() for p in module.parameters()) == expected_count
    assert set(module.layers[0].keys()) == {"attn", "ffn"}
    plus_plus = CompacterModule(CompacterConfig(reduction_factor=4, placement="pfeiffer"), 32, 2)
    assert set(plus_plus.layers[0].keys()) == {"ffn"}, "Compacter++: after the FFN only"


def test_init_is_the_identity_yet_every_up_projection_gets_a_gradient(base):
    ids = torch.randint(5, len(base.tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base.model(input_ids=ids).logits
    module = CompacterModule(CompacterConfig(reduction_factor=4), base.hidden_size, len(base.layers))
    hooks = attach_adapters(base.model, base.arch, [module])
    out = base.model(input_ids=ids).logits
    assert torch.equal(out.detach(), ref)
    out.square().sum().backward()
    hooks.remove()
    for i, block in enumerate(module.layers):
        for site, bottleneck in block.items():
            assert bottleneck.up.W_right.grad.abs().sum() > 0, f"layer {i} {site}: the zero factor receives gradient"
            assert bottleneck.up.W_left.abs().sum() > 0 and not bottleneck.up.W_right.any(), "only W_right is zero"


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_the_site_computes_the_bottleneck_adapters_formula(base, placement):
    """houlsby: LN(h + A(h) + x); pfeiffer: LN(h + A(LN(h + x)) + x), A = up(gelu(down(.))) with PHM projections."""
    module = CompacterModule(CompacterConfig(reduction_factor=4, placement=placement), base.hidden_size, len(base.layers))
    _randomise(module, 2)
    sub = base.layers[1].get_submodule(base.arch.ffn_output)
    inner, x = torch.randn(2, 4, sub.dense.in_features), torch.randn(2, 4, base.hidden_size)
    rule = module.phm_rule
    block = module.layers[1]["ffn"]
    base.model.eval()
    with torch.no_grad():
        def adapter(z):
            return torch.nn.functional.gelu(z @ block.down.weight(rule) + block.down.b) @ block.up.weight(rule) + block.up.b
        h = sub.dense(inner)
        inside = h if placement == "houlsby" else sub.LayerNorm(h + x)
        expected_out = sub.LayerNorm(h + adapter(inside) + x)
        hooks = attach_adapters(base.model, base.arch, [module])
        got = sub(inner, x)
        hooks.remove()
    torch.testing.assert_close(got, expected_out, rtol=1e-5, atol=1e-5)


def test_stacks_over_a_madx_adapter_as_adapters_do(base):
    """A compacter over a language adapter at one FFN site: h1 = h + A(LN(h + x)), h2 = h1 + C(LN(h1 + x))."""
    lang = AdapterModule(AdapterConfig(invertible=False), base.hidden_size, len(base.layers))
    task = CompacterModule(CompacterConfig(reduction_factor=4, placement="pfeiffer"), base.hidden_size, len(base.layers))
    _randomise(lang, 3, 0.1)
    _randomise(task, 4)
    sub = base.layers[0].get_submodule(base.arch.ffn_output)
    inner, x = torch.randn(1, 3, sub.dense.in_features), torch.randn(1, 3, base.hidden_size)
    base.model.eval()
    with torch.no_grad():
        h = sub.dense(inner)
        h1 = h + lang.layers[0]["ffn"](sub.LayerNorm(h + x))
        h2 = h1 + task.layers[0]["ffn"](sub.LayerNorm(h1 + x), task.phm_rule)
        expected_out = sub.LayerNorm(h2 + x)
        hooks = [attach_adapters(base.model, base.arch, [lang]), attach_adapters(base.model, base.arch, [task])]
        got = sub(inner, x)
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(got, expected_out, rtol=1e-5, atol=1e-6)


def _from_adapterhub(case: str) -> dict[str, torch.Tensor]:
    """The fixture's AdapterHub weights renamed by the table in compacter.py's docstring."""
    weights = torch.load(FIXTURES / "adapterhub" / case / "pytorch_adapter.bin", weights_only=True)
    out = {}
    for key, tensor in weights.items():
        if ".shared_parameters." in key:
            out[key.rsplit(".", 1)[1]] = tensor
            continue
        head, _, tail = key.partition(".adapters.sw.")
        layer = int(head.split("encoder.layer.")[1].split(".")[0])
        site = "attn" if head.endswith("attention.output") else "ffn"
        part, name = tail.replace("adapter_down.0", "down").replace("adapter_up", "up").split(".")
        out[f"layers.{layer}.{site}.{part}.{name}"] = tensor
    return out


@pytest.mark.parametrize("case, placement", [("compacter", "houlsby"), ("compacter++", "pfeiffer")])
def test_adapterhub_weights_give_adapterhubs_logits(case, placement):
    """AdapterHub 1.3.0's CompacterConfig / CompacterPlusPlusConfig (reduction factor 4) weights, renamed, in our module."""
    base = xlpeft.load_base(base_dir("tiny-bert"))
    module = CompacterModule(CompacterConfig(reduction_factor=4, placement=placement), base.hidden_size,
                             len(base.layers))
    module.load_state_dict(_from_adapterhub(case), strict=True)
    hooks = attach_adapters(base.model, base.arch, [module])
    diff = max_diff(base.model, expected("adapterhub", case))
    hooks.remove()
    assert diff <= TOLERANCE, f"{case}: max |logits - AdapterHub's| = {diff:.3g}"
    assert max_diff(base.model, expected("adapterhub", case)) > 1e-3, "the adapter changed the logits"


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"phm_dim.*>= 1.*0"):
        build(CompacterConfig, {"phm_dim": "0"})
    with pytest.raises(ConfigError, match=r"phm_rank.*>= 1"):
        CompacterConfig(phm_rank=0)
    with pytest.raises(ConfigError, match=r"placement.*pfeiffer, houlsby"):
        CompacterConfig(placement="parallel")
    with pytest.raises(ConfigError) as err:
        CompacterModule(CompacterConfig(phm_dim=5), 32, 2)
    message = str(err.value)
    assert "\n" not in message and "hidden size (32)" in message and "bottleneck width (1" in message
    with pytest.raises(ConfigError, match=r"bottleneck width \(6 = 24 // reduction_factor 4\)"):
        CompacterModule(CompacterConfig(reduction_factor=4), 24, 2)  # 24 divides by 4, its bottleneck 6 does not
