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


def _saved_module(tmp_path, base, config: AdapterConfig, seed: int):
    """A saved language adapter module with non-trivial weights, as a trained one would be."""
    from dataclasses import asdict

    from xlpeft.io import Manifest, load_module, save_module

    module = AdapterModule(config, base.hidden_size, len(base.layers))
    _randomise(module, seed)
    manifest = Manifest(kind="language", method="adapter", lang="sw", config=asdict(config),
                        base={"name": base.name, "fingerprint": base.fingerprint, "model_type": "x"})
    return load_module(save_module(tmp_path / f"lang-{seed}", manifest, {"adapter": module.state_dict()}))


def _saved_delta(tmp_path, base):
    """A saved language SFT touching two weights of the base."""
    from dataclasses import asdict

    from xlpeft.io import Manifest, load_module, save_module
    from xlpeft.methods.sft import SFTConfig, SparseDelta

    names = [n for n, _ in base.model.named_parameters() if n.endswith("dense.weight")][:2]
    delta = SparseDelta({n: (torch.tensor([0, 5, 9]), torch.tensor([0.5, -0.5, 0.25])) for n in names})
    manifest = Manifest(kind="language", method="sft", lang="sw", config=asdict(SFTConfig()),
                        base={"name": base.name, "fingerprint": base.fingerprint, "model_type": "x"})
    return load_module(save_module(tmp_path / "sft", manifest, {"delta": delta.to_tensors()}))


@pytest.mark.parametrize("lang_kind", ["adapter+inv", "adapter", "sft"])
def test_language_module_stays_frozen_while_a_task_adapter_trains(base, tmp_path, lang_kind):
    """Defect 4 (issue 14): the activated language module computes and stores no gradient; only the task module does."""
    from xlpeft.compose import activate
    from xlpeft.config import TrainConfig
    from xlpeft.methods.adapters import prepare_adapter
    from xlpeft.methods.heads import build_head
    from xlpeft.training import task_loss, train_loop

    saved = (_saved_delta(tmp_path, base) if lang_kind == "sft" else
             _saved_module(tmp_path, base, AdapterConfig(invertible=lang_kind == "adapter+inv"), 7))
    active = activate(base, [saved])
    lang = torch.nn.ModuleList(active.modules())  # empty for an SFT: it adds into the base's own weights
    before = {k: v.clone() for k, v in lang.state_dict().items()}
    cfg = TrainConfig(max_steps=3, lr=1e-3, warmup_ratio=0.0)
    trainable = prepare_adapter(base, AdapterConfig(**AdapterConfig.defaults_for("task")), cfg)
    head = build_head("token_classification", base.hidden_size, 3, 0.0)
    ids = _ids(base, n=4, t=9)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids % 3}
    params = trainable.begin_phase(trainable.phases[0]) + list(head.parameters())
    train_loop(params, iter(lambda: batch, None), lambda b: task_loss(base, head, b), cfg, 3, lambda *a: None,
               progress=False)
    trainable.close()
    active.remove()
    assert [n for n, p in lang.named_parameters() if p.grad is not None] == [], "the language adapter holds gradients"
    assert [n for n, p in lang.named_parameters() if p.requires_grad] == []
    assert [n for n, p in base.model.named_parameters() if p.grad is not None or p.requires_grad] == []
    assert all(torch.equal(v, before[k]) for k, v in lang.state_dict().items())
    assert all(p.grad is not None for p in params), "the task adapter and head did train"


def test_default_non_linearity_follows_the_adapterhub_preset_of_the_placement():
    """houlsby = AdapterHub's DoubleSeqBnConfig (swish), pfeiffer = SeqBnConfig (relu); an explicit value wins."""
    from xlpeft.interop.adapterhub import PRESETS, adapter_config_from

    for preset, placement in (("seq_bn", "pfeiffer"), ("seq_bn_inv", "pfeiffer"), ("double_seq_bn", "houlsby"),
                              ("double_seq_bn_inv", "houlsby")):
        ours = AdapterConfig(placement=placement, reduction_factor=16, invertible=preset.endswith("_inv"))
        assert ours == adapter_config_from(PRESETS[preset], num_layers=2), preset
    houlsby = AdapterModule(AdapterConfig(placement="houlsby"), 32, 1)
    assert isinstance(houlsby.layers[0]["attn"].act, torch.nn.SiLU) and isinstance(houlsby.invertible.F.act, torch.nn.SiLU)
    assert AdapterConfig(placement="houlsby", non_linearity="relu").non_linearity == "relu"
    assert build(AdapterConfig, {"placement": "houlsby", "non_linearity": None}).non_linearity == "swish"


def test_modules_that_recorded_their_non_linearity_load_identically(base, tmp_path):
    """A houlsby module saved with relu (the old default, recorded in its manifest) still computes relu."""
    from xlpeft.compose import activate

    saved = _saved_module(tmp_path, base, AdapterConfig(placement="houlsby", non_linearity="relu"), 3)
    assert saved.manifest.config["non_linearity"] == "relu"
    module = AdapterModule(AdapterConfig(placement="houlsby", non_linearity="relu"), base.hidden_size, len(base.layers))
    module.load_state_dict(saved.tensors["adapter"])
    ids = _ids(base)
    base.model.eval()
    with torch.no_grad():
        handle = attach_adapters(base.model, base.arch, [module])
        expected = base.model(input_ids=ids).logits
        handle.remove()
        active = activate(base, [saved])
        got = base.model(input_ids=ids).logits
        rebuilt = active.modules()[0]
        active.remove()
    assert isinstance(rebuilt.layers[0]["attn"].act, torch.nn.ReLU) and rebuilt.config.non_linearity == "relu"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
