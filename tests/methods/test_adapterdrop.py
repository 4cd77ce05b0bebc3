"""AdapterDrop (Rücklé et al. 2021): k ~ U{0..N} lowest layers skipped per training step, resumable; N fixed at inference."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from tests.methods.test_adapters import _saved_delta
from xlpeft.compose import activate, compose
from xlpeft.composed import COMPOSITION_FILE, load_composed, save_composed
from xlpeft.config import TrainConfig
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.io import Manifest, load_module, save_module
from xlpeft.methods.adapterdrop import DropTrainable
from xlpeft.methods.adapters import AdapterConfig, AdapterModule
from xlpeft.methods.compacter import CompacterConfig
from xlpeft.methods.parallel import ParallelConfig
from xlpeft.registry import get_method

CONFIGS = {"adapter": AdapterConfig(invertible=False), "compacter": CompacterConfig(reduction_factor=4),
           "parallel": ParallelConfig()}


def _ids(base) -> torch.Tensor:
    return torch.randint(5, len(base.tokenizer), (2, 8), generator=torch.Generator().manual_seed(0))


def _spy(module) -> list[int]:
    """Record the layers whose sites the module acts at, in call order."""
    calls: list[int] = []
    inner = module.apply_at

    def apply_at(layer, site, h, x, layer_norm):
        calls.append(layer)
        return inner(layer, site, h, x, layer_norm)

    module.apply_at = apply_at
    return calls


@pytest.mark.parametrize("method", list(CONFIGS))
def test_training_skips_the_lowest_k_layers_drawn_each_step(base, method):
    layers = len(base.layers)
    config = type(CONFIGS[method])(**{**asdict(CONFIGS[method]), "adapter_drop": layers - 1})
    trainable = get_method(method).prepare(base, config, TrainConfig(max_steps=16, seed=3))
    assert isinstance(trainable, DropTrainable)
    calls = _spy(trainable.module)
    phase = trainable.phases[0]
    trainable.begin_phase(phase)
    ids, drawn = _ids(base), []
    for step in range(1, 17):
        k = trainable.module.step_drop
        drawn.append(k)
        calls.clear()
        base.model.train()
        base.model(input_ids=ids)
        assert set(calls) == set(range(k, layers)), f"step {step}: k={k}, acted at {sorted(set(calls))}"
        if step % 8 == 0:  # evaluation inside training: nothing is dropped in eval mode
            calls.clear()
            base.model.eval()
            base.model(input_ids=ids)
            assert set(calls) == set(range(layers))
        trainable.after_step(phase, step)
    assert set(drawn) == set(range(layers)), f"k uniform over 0..{layers - 1}: drew {sorted(set(drawn))}"
    tensors, _ = trainable.export()
    assert all(not k.startswith("adapter_drop") for state in tensors.values() for k in state), "not saved"
    trainable.close()
    calls.clear()
    assert trainable.module.step_drop == 0


def test_resume_continues_the_same_draws_and_the_seed_decides_them(base):
    layers = len(base.layers)
    config = AdapterConfig(invertible=False, adapter_drop=layers - 1)

    def draws(trainable, n: int, start: int = 1) -> list[int]:
        out = []
        for step in range(start, start + n):
            out.append(trainable.module.step_drop)
            trainable.after_step(trainable.phases[0], step)
        return out

    first = get_method("adapter").prepare(base, config, TrainConfig(max_steps=30, seed=5))
    first.begin_phase(first.phases[0])
    before = draws(first, 10)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    after = draws(first, 20, start=11)
    first.close()
    resumed = get_method("adapter").prepare(base, config, TrainConfig(max_steps=30, seed=99))
    resumed.resume_phase(resumed.phases[0], state)
    assert draws(resumed, 20, start=11) == after, "a resumed run draws what the uninterrupted one drew"
    assert all(torch.equal(p, state[n]) for n, p in resumed.module.state_dict().items())
    resumed.close()
    again = get_method("adapter").prepare(base, config, TrainConfig(max_steps=30, seed=5))
    again.begin_phase(again.phases[0])
    assert draws(again, 10) == before, "the run's seed decides the draws (the same on every rank)"
    again.close()
    with pytest.raises(XlpeftError, match="no AdapterDrop state"):
        plain = {k: v for k, v in state.items() if not k.startswith("adapter_drop")}
        get_method("adapter").prepare(base, config, TrainConfig(max_steps=30)).resume_phase(first.phases[0], plain)


def test_training_drop_keeps_the_top_layer(base):
    layers = len(base.layers)
    with pytest.raises(ConfigError, match=rf"`adapter_drop` should be at most {layers - 1} .*got {layers}"):
        get_method("parallel").prepare(base, ParallelConfig(adapter_drop=layers), TrainConfig(max_steps=2))


def _saved(tmp_path, base, seed: int = 1):
    config = AdapterConfig(invertible=False)
    module = AdapterModule(config, base.hidden_size, len(base.layers))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    manifest = Manifest(kind="language", method="adapter", lang="sw", config=asdict(config),
                        base={"name": base.name, "fingerprint": base.fingerprint, "model_type": "x"})
    return module, load_module(save_module(tmp_path / f"lang-{seed}", manifest, {"adapter": module.state_dict()}))


def test_inference_drop_equals_the_module_without_its_lowest_layers(base, tmp_path):
    module, saved = _saved(tmp_path, base)
    ids = _ids(base)
    state = module.state_dict()
    for name in state:  # the same module with layer 0's up-projection zeroed: the identity there
        if name.startswith("layers.0.") and ".up." in name:
            state[name] = torch.zeros_like(state[name])
    manifest = saved.manifest
    without_layer0 = load_module(save_module(tmp_path / "no-layer-0", manifest, {"adapter": state}))
    with torch.no_grad():
        expected_out = compose(base, [without_layer0])(input_ids=ids).logits
        full = compose(base, [saved])(input_ids=ids).logits
        model = compose(base, [saved], adapter_drop=1)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected_out, rtol=0, atol=1e-6)
    assert not torch.allclose(got, full, atol=1e-4), "dropping layer 0's adapter changes the outputs"
    assert model.xlpeft_composition.adapter_drop == 1 and "adapter_drop=1" in model.xlpeft_composition.describe()
    out = save_composed(model, tmp_path / "composed", base.tokenizer)
    assert json.loads((out / COMPOSITION_FILE).read_text())["adapter_drop"] == 1
    with torch.no_grad():
        reloaded = load_composed(out)(input_ids=ids).logits
    torch.testing.assert_close(reloaded, got, rtol=0, atol=1e-6)
    active = activate(base, model.xlpeft_composition)  # the record's value applies when activated by hand too
    assert active.modules()[0].drop_below == 1
    active.remove()


def test_inference_drop_needs_an_adapter_like_module_and_fitting_layers(base, tmp_path):
    with pytest.raises(XlpeftError, match="holds no adapter-like module"):
        compose(base, [_saved_delta(tmp_path, base)], adapter_drop=1)
    _, saved = _saved(tmp_path, base)
    with pytest.raises(XlpeftError, match=rf"between 0 and {len(base.layers)}"):
        compose(base, [saved], adapter_drop=len(base.layers) + 1)
    assert compose(base, [_saved_delta(tmp_path, base)], adapter_drop=0) is not None
