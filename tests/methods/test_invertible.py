import pytest
import torch

from xlpeft.errors import XlpeftError
from xlpeft.methods.invertible import InvertibleAdapter


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "tanh"])
def test_inverse_undoes_forward(non_linearity):
    inv = InvertibleAdapter(64, reduction_factor=2, non_linearity=non_linearity)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in inv.parameters():  # non-trivial weights: the zero-init identity would prove nothing
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        x = torch.randn(3, 7, 64, generator=g)
        y = inv(x)
        assert not torch.allclose(y, x, atol=1e-3)
        torch.testing.assert_close(inv.inverse(y), x, rtol=0, atol=1e-5)
        torch.testing.assert_close(inv(inv.inverse(x)), x, rtol=0, atol=1e-5)


def test_inverse_is_exact_algebra_in_float64():
    """Large weights amplify float32 rounding; in float64 the coupling inverts to machine precision."""
    inv = InvertibleAdapter(64).double()
    with torch.no_grad():
        for p in inv.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64))
        x = torch.randn(5, 64, dtype=torch.float64)
        torch.testing.assert_close(inv.inverse(inv(x)), x, rtol=0, atol=1e-10)


def test_untrained_invertible_is_identity():
    inv = InvertibleAdapter(32)
    x = torch.randn(2, 4, 32)
    torch.testing.assert_close(inv(x), x, rtol=0, atol=0)


def test_odd_hidden_size_is_refused():
    with pytest.raises(XlpeftError, match="odd"):
        InvertibleAdapter(33)


def test_invertible_hooks_on_embeddings_and_decoder(base):
    """With bottlenecks at identity, the invertible adapter's forward+inverse leave MLM logits unchanged
    only if the inverse really runs before the decoder: check both directions."""
    from xlpeft.methods.adapters import AdapterConfig, AdapterModule, attach_adapters

    ids = torch.randint(5, len(base.tokenizer), (2, 8), generator=torch.Generator().manual_seed(1))
    module = AdapterModule(AdapterConfig(), base.hidden_size, len(base.layers))
    with torch.no_grad():
        for p in module.invertible.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    seen = {}
    emb = base.model.get_submodule(base.arch.embeddings)
    probe = emb.register_forward_hook(lambda m, a, out: seen.setdefault("raw", out.clone()))
    handle = attach_adapters(base.model, base.arch, [module])
    emb_out = {}
    probe2 = emb.register_forward_hook(lambda m, a, out: emb_out.setdefault("adapted", out.clone()))
    base.model.eval()
    with torch.no_grad():
        base.model(input_ids=ids)
    handle.remove()
    probe.remove()
    probe2.remove()
    torch.testing.assert_close(emb_out["adapted"], module.invertible(seen["raw"]))
