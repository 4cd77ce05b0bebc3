import pytest
import torch

from xlpeft.config import build
from xlpeft.errors import ConfigError
from xlpeft.methods.adapters import AdapterConfig, AdapterModule, attach_adapters


def _ids(base, n=2, t=10):
    g = torch.Generator().manual_seed(0)
    return torch.randint(5, len(base.tokenizer), (n, t), generator=g)


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_untrained_adapter_is_identity(base, placement):
    ids = _ids(base)
    with torch.no_grad():
        ref = base.model(input_ids=ids).logits
    module = AdapterModule(AdapterConfig(placement=placement), base.hidden_size, len(base.layers))
    handle = attach_adapters(base.model, base.arch, [module])
    with torch.no_grad():
        out = base.model(input_ids=ids).logits
    handle.remove()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_trained_adapter_changes_output_and_detach_restores(base):
    ids = _ids(base)
    with torch.no_grad():
        ref = base.model(input_ids=ids).logits
    module = AdapterModule(AdapterConfig(), base.hidden_size, len(base.layers))
    _randomise(module)
    handle = attach_adapters(base.model, base.arch, [module])
    with torch.no_grad():
        out = base.model(input_ids=ids).logits
    handle.remove()
    with torch.no_grad():
        again = base.model(input_ids=ids).logits
    assert not torch.allclose(out, ref, atol=1e-4)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)


def test_pfeiffer_matches_manual_formula(base):
    """LN(h + A(LN(h + x)) + x) at the FFN output of layer 0, computed by hand."""
    module = AdapterModule(AdapterConfig(invertible=False), base.hidden_size, len(base.layers))
    _randomise(module, seed=3)
    sub = base.layers[0].get_submodule(base.arch.ffn_output)
    inner = torch.randn(2, 5, sub.dense.in_features)
    x = torch.randn(2, 5, base.hidden_size)
    base.model.eval()
    with torch.no_grad():
        h = sub.dense(inner)
        expected = sub.LayerNorm(h + module.layers[0]["ffn"](sub.LayerNorm(h + x)) + x)
        handle = attach_adapters(base.model, base.arch, [module])
        got = sub(inner, x)
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_houlsby_places_adapters_after_attention_and_ffn(base):
    module = AdapterModule(AdapterConfig(placement="houlsby", invertible=False), base.hidden_size, len(base.layers))
    assert set(module.layers[0].keys()) == {"attn", "ffn"}
    _randomise(module, seed=4)
    sub = base.layers[1].get_submodule(base.arch.attn_output)
    inner, x = torch.randn(1, 4, base.hidden_size), torch.randn(1, 4, base.hidden_size)
    base.model.eval()
    with torch.no_grad():
        h = sub.dense(inner)
        expected = sub.LayerNorm(h + module.layers[1]["attn"](h) + x)
        handle = attach_adapters(base.model, base.arch, [module])
        got = sub(inner, x)
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_stack_applies_bottom_first(base):
    """Two modules attached in order act like one stack: task sees the language-adapted h."""
    lang = AdapterModule(AdapterConfig(invertible=False), base.hidden_size, len(base.layers))
    task = AdapterModule(AdapterConfig(reduction_factor=16, invertible=False), base.hidden_size, len(base.layers))
    _randomise(lang, 5)
    _randomise(task, 6)
    sub = base.layers[0].get_submodule(base.arch.ffn_output)
    inner, x = torch.randn(1, 3, sub.dense.in_features), torch.randn(1, 3, base.hidden_size)
    base.model.eval()
    with torch.no_grad():
        h = sub.dense(inner)
        h1 = h + lang.layers[0]["ffn"](sub.LayerNorm(h + x))
        h2 = h1 + task.layers[0]["ffn"](sub.LayerNorm(h1 + x))
        expected = sub.LayerNorm(h2 + x)
        handles = [attach_adapters(base.model, base.arch, [lang]), attach_adapters(base.model, base.arch, [task])]
        got = sub(inner, x)
        for hd in handles:
            hd.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_reduction_factor_sets_bottleneck_width():
    module = AdapterModule(AdapterConfig(reduction_factor=16, invertible=False), 64, 2)
    assert module.layers[0]["ffn"].down.out_features == 4
    assert module.invertible is None


def test_config_validation_names_field_and_value():
    with pytest.raises(ConfigError, match=r"reduction_factor.*> 0.*-2"):
        AdapterConfig(reduction_factor=-2)
    with pytest.raises(ConfigError, match=r"placement.*pfeiffer, houlsby.*'middle'"):
        AdapterConfig(placement="middle")
    with pytest.raises(ConfigError, match="unknown AdapterConfig key"):
        build(AdapterConfig, {"reduction": 2})
