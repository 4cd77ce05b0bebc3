"""Activation checkpointing (``--set activation_checkpointing=true``): the same module, the layers recomputed.

One row per registered method and module kind, as in the method contract: trained with and
without checkpointing from the same seed, the exported module and its outputs agree, the layers
really were recomputed, and the base is left as it was. The sparse delta's entry taps count
forward passes against backward passes, so a dynamic delta trained through them is checked
across reselections too.
"""

import pytest
import torch

from tests.methods.mlm_data import masked_loss, random_batches
from tests.methods.test_contract import METHODS, outputs, prepare, probe, run_phases
from xlpeft.config import TrainConfig
from xlpeft.errors import ConfigError
from xlpeft.methods.base import MODULE_KINDS
from xlpeft.methods.sft import SFTConfig, SFTTrainable
from xlpeft.models import load_base
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.recompute import checkpointed_activations, recompute_count
from xlpeft.training import train_loop


def _flat(tensors: dict) -> dict[str, torch.Tensor]:
    return {f"{stem}/{k}": v for stem, state in tensors.items() for k, v in state.items()}


def _train(base_dir, method: str, kind: str, checkpointed: bool):
    base = load_base(str(base_dir))
    trainable, head, _, train_cfg = prepare(base, method, kind, seed=0)  # seeds the dropout stream too
    try:
        with checkpointed_activations(base.model, checkpointed):
            run_phases(base, trainable, train_cfg, kind, head, seed=0)
        trained = outputs(base, probe(base))
        tensors, _ = trainable.export()
    finally:
        trainable.close()
    return _flat(tensors), trained, base


@pytest.mark.parametrize("kind", MODULE_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_checkpointed_training_trains_the_same_module(base_dirs, method, kind):
    plain, plain_out, _ = _train(base_dirs["tiny-bert"], method, kind, checkpointed=False)
    before = recompute_count()
    checked, checked_out, base = _train(base_dirs["tiny-bert"], method, kind, checkpointed=True)
    assert recompute_count() > before, "the encoder layers were recomputed in the backward pass"
    assert checked.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(checked_out, plain_out, rtol=1e-5, atol=1e-5)
    model = base.model
    assert not model.is_gradient_checkpointing, "checkpointing is switched off after training"
    model.train()
    ids = probe(base)
    assert not model(input_ids=ids).logits.requires_grad, "no gradient hook left on the frozen embeddings"


@pytest.mark.parametrize("entry_gradients", ["sampled", "dense", "autograd"])
@pytest.mark.parametrize("growth", ["rigl", "sm3"])
def test_dynamic_delta_through_entry_taps_reselects_the_same(base_dirs, entry_gradients, growth):
    """The taps pair each forward with its backward; a recomputed layer must not count as one more forward,
    or a tensor's growth statistics are never handed over and the reselections differ."""
    cfg = TrainConfig(lr=1e-2, max_steps=9, log_every=100)

    def train(checkpointed: bool):
        base = load_base(str(base_dirs["tiny-bert"]))
        config = SFTConfig(num_params=600, selection="dynamic", reselect_every=4, accumulation_steps=2,
                           reselection_rate=0.5, growth=growth, entry_gradients=entry_gradients)
        torch.manual_seed(0)
        t = SFTTrainable(base, config, cfg)
        params = t.begin_phase(t.phases[0])
        seen = []

        def after(step):
            t.after_step(t.phases[0], step)
            seen.append({n: i.clone() for n, i in t.indices.items()})

        base.model.train()
        with checkpointed_activations(base.model, checkpointed):
            train_loop(params, random_batches(base), masked_loss(base), cfg, 9, lambda *_: None, after_step=after,
                       progress=False)
        metrics = t.end_phase(t.phases[0])
        values = {n: v.detach().clone() for n, v in t.values.items()}
        t.close()
        return seen, values, metrics

    plain, plain_values, plain_metrics = train(False)
    checked, checked_values, checked_metrics = train(True)
    assert plain_metrics["reselections"] == checked_metrics["reselections"] == 2
    for step, (a, b) in enumerate(zip(plain, checked, strict=True), start=1):
        assert all(torch.equal(a[n], b[n]) for n in a), f"step {step}: different entries selected"
    for name in plain_values:
        torch.testing.assert_close(checked_values[name], plain_values[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_model_without_checkpointing_is_refused_by_name(base):
    base.model.supports_gradient_checkpointing = False  # as a transformers class without per-layer checkpointing
    with pytest.raises(ConfigError, match=f"{type(base.model).__name__} has no activation checkpointing.*drop --set"):
        with checkpointed_activations(base.model):
            pass


def test_train_lang_takes_the_setting_and_records_it(workdir, base_dirs, sw_corpus):
    def run(out: str, *extra: tuple[str, str]):
        sets = {"max_steps": "3", "max_seq_len": "32", "lr": "1e-2", **dict(extra)}
        req = LangRequest(lang="sw", base=str(base_dirs["tiny-bert"]), corpus=(str(sw_corpus),),
                          output=str(workdir / out), sets=sets)
        return train_language(req)

    before = recompute_count()
    checked = run("checked", ("activation_checkpointing", "true"))
    assert recompute_count() > before
    plain = run("plain")
    from xlpeft import load_module

    a, b = load_module(checked.path), load_module(plain.path)
    assert a.manifest.training["train"]["activation_checkpointing"] is True
    assert b.manifest.training["train"]["activation_checkpointing"] is False
    for k, v in b.tensors["adapter"].items():
        torch.testing.assert_close(a.tensors["adapter"][k], v, rtol=1e-5, atol=1e-6, msg=k)
