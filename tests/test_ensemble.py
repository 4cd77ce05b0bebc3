"""Test-time ensembles (compose --ensemble, EMEA): one member is that member, zero EMEA steps is the plain
average, EMEA moves weight to the confident member, members never see each other's modules; the recipe."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import EN_WORDS, SW_WORDS, make_lines, make_ner, use_store, write_conll
from xlpeft import compose, load_module, tracking
from xlpeft.compose import ModuleRef
from xlpeft.ensemble import EnsembleConfig, build_ensemble, ensemble_weights
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.models import load_base
from xlpeft.recipes.ensemble import EnsembleRequest, compose_ensemble
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.recipes.train_task import TaskRequest, train_task


@pytest.fixture(scope="module")
def store(tmp_path_factory, base_dirs):
    """en and sw language modules (an adapter and an sft delta) and an English NER task adapter on tiny-bert."""
    root = tmp_path_factory.mktemp("ensemble")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        base = str(base_dirs["tiny-bert"])
        for lang, words, method, extra in (("en", EN_WORDS, "adapter", {}), ("sw", SW_WORDS, "sft", {"num_params": "3000"})):
            corpus = root / f"{lang}.txt"
            corpus.write_text("\n".join(make_lines(words, 150)), encoding="utf-8")
            train_language(LangRequest(lang=lang, method=method, base=base, corpus=(str(corpus),),
                                       sets={"max_steps": "6", "max_seq_len": "32", "lr": "1e-2", **extra}))
        write_conll(root / "train.conll", make_ner(120, seed=1))
        write_conll(root / "yo.conll", make_ner(20, seed=7))
        train_task(TaskRequest(task="ner", base=base, train_data=str(root / "train.conll"),
                               sets={"max_steps": "30", "batch_size": "16", "max_seq_len": "48", "lr": "3e-3"}))
        yield {"root": root, "base": base}


@pytest.fixture
def env(store, monkeypatch):
    use_store(monkeypatch, store["root"])
    return store


def _batch(base, n=3, t=10):
    ids = torch.randint(5, len(base.tokenizer), (n, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _refs():
    return [ModuleRef.of(load_module(p)) for p in ("modules/lang-en-adapter", "modules/lang-sw-sft",
                                                    "modules/task-ner-adapter")]


def test_an_ensemble_of_one_is_that_member(env):
    base = load_base(env["base"])
    en, _, task = _refs()
    batch = _batch(base)
    with torch.no_grad():
        alone = compose(base, [en.module, task.module])(**batch).logits
        ens = build_ensemble(base, [en], task, EnsembleConfig(emea_steps=3))(**batch).logits
    torch.testing.assert_close(ens, torch.log_softmax(alone, -1), rtol=0, atol=1e-6)


def test_zero_emea_steps_is_the_plain_average_and_members_do_not_see_each_other(env):
    base = load_base(env["base"])
    en, sw, task = _refs()
    batch = _batch(base)
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    with torch.no_grad():
        p_en = compose(base, [en.module, task.module])(**batch).logits.softmax(-1)
        p_sw = compose(base, [sw.module, task.module])(**batch).logits.softmax(-1)
        model = build_ensemble(base, [en, sw], task)
        got = model(**batch).logits
        again = model(**batch).logits
    torch.testing.assert_close(got.exp(), (p_en + p_sw) / 2, rtol=0, atol=1e-6)
    assert torch.equal(got, again), "each member's modules are removed after its pass"
    assert model.last_weights.tolist() == [0.5, 0.5]
    assert all(torch.equal(p, before[n]) for n, p in base.model.named_parameters()), "the base is untouched"


def test_emea_moves_weight_to_the_confident_member():
    confident = torch.log_softmax(torch.tensor([[[6.0, 0.0, 0.0]] * 4]), -1)  # (1, 4, 3) -> (B=1, T=4, C=3)
    unsure = torch.log_softmax(torch.zeros(1, 4, 3), -1)
    log_probs = torch.stack([unsure, confident])  # (n=2, 1, 4, 3)
    plain = ensemble_weights(log_probs, torch.ones(1, 4), EnsembleConfig())
    adapted = ensemble_weights(log_probs, torch.ones(1, 4), EnsembleConfig(emea_steps=5, emea_lr=1.0))
    assert plain.tolist() == [0.5, 0.5]
    assert adapted[1] > 0.6 and torch.isclose(adapted.sum(), torch.tensor(1.0))
    masked = ensemble_weights(log_probs, torch.zeros(1, 4), EnsembleConfig(emea_steps=5, emea_lr=1.0))
    assert masked.tolist() == [0.5, 0.5], "no position counts: no gradient, the plain average"


@pytest.mark.parametrize("kwargs, named", [({"emea_steps": -1}, "`emea_steps` should be >= 0"),
                                           ({"emea_lr": 0.0}, "`emea_lr` should be > 0.0"),
                                           ({"emea_lr": float("inf")}, "`emea_lr` should be a finite number")])
def test_bad_ensemble_settings_are_one_line_errors(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        EnsembleConfig(**kwargs)


def test_compose_ensemble_scores_a_language_without_a_module_against_its_members_and_the_baseline(env):
    req = EnsembleRequest(lang="yo", task="ner", members=("sw", "en"), base=env["base"],
                          eval_data=str(env["root"] / "yo.conll"), config=EnsembleConfig(emea_steps=2))
    r = compose_ensemble(req)
    assert set(r.members) == {"sw", "en"} and r.baseline_lang == "en"
    assert 0.0 <= r.metrics["f1"] <= 1.0 and len(r.weights) == 2
    run = tracking.client().get_run(r.run_id)
    assert run.data.tags["xlpeft.ensemble"] == "sw,en" and run.data.tags["xlpeft.ensemble_kind"] == "emea"
    assert {"eval_f1", "baseline_f1", "member_sw_f1", "member_en_f1"} <= set(run.data.metrics)
    assert run.data.params["ensemble.emea_steps"] == "2"
    with pytest.raises(XlpeftError, match="lists a language twice"):
        compose_ensemble(EnsembleRequest(lang="yo", task="ner", members=("sw", "sw"), base=env["base"]))
    with pytest.raises(XlpeftError, match="no registered language module"):
        compose_ensemble(EnsembleRequest(lang="yo", task="ner", members=("sw", "ha"), base=env["base"]))


def test_compose_ensemble_command_prints_the_comparison_and_refuses_what_it_cannot_do(env, capsys):
    from tests.test_cli import assert_one_error_line, run_cli
    from xlpeft.cli import main

    main(["compose", "--lang", "yo", "--task", "ner", "--base", env["base"], "--ensemble", "sw,en", "--emea",
          "--eval-data", str(env["root"] / "yo.conll")])
    out = capsys.readouterr().out
    assert "through an ensemble of sw, en (EMEA, 1 step(s) a batch)" in out
    assert "sw language module alone: f1" in out and "baseline (en language module)" in out
    assert "last batch's weights: sw " in out
    code, _, err = run_cli(capsys, "compose", "--lang", "yo", "--task", "ner", "--base", env["base"],
                           "--ensemble", "sw,en", "--output", "out")
    assert_one_error_line(code, err, "cannot be combined with --output")
    code, _, err = run_cli(capsys, "compose", "--lang", "sw", "--task", "ner", "--base", env["base"], "--emea")
    assert_one_error_line(code, err, "give the languages with --ensemble")


# ---- compose --fallback related: the closest registered languages stand in for a target without a module


def test_fallback_related_uses_the_closest_languages_module_and_says_why(env, capsys):
    from xlpeft.cli import main

    rw = env["root"] / "rw.conll"
    write_conll(rw, make_ner(20, seed=9))
    main(["compose", "--lang", "rw", "--task", "ner", "--base", env["base"], "--fallback", "related",
          "--eval-data", str(rw)])
    captured = capsys.readouterr()
    assert ("rw has no language module on this base; using the closest language's module: sw (same genus Bantoid, "
            "same family Atlantic-Congo, same script Latn) (also considered: en (same script Latn))") in captured.err
    assert "sw language module + task module: f1" in captured.out
    runs = tracking.client().search_runs([tracking.client().get_experiment_by_name(tracking.EXPERIMENT).experiment_id],
                                         "tags.`xlpeft.lang` = 'rw'", max_results=1, order_by=["start_time DESC"])
    tags, metrics = runs[0].data.tags, runs[0].data.metrics
    assert tags["xlpeft.lang_module_lang"] == "sw" and tags["xlpeft.parent.lang_module"].startswith("xlpeft-lang-sw-")
    # the same score as composing sw's module by hand on rw's data
    by_hand = compose_ensemble(EnsembleRequest(lang="rw", task="ner", members=("sw",), base=env["base"],
                                               eval_data=str(rw)))
    assert metrics["eval_f1"] == pytest.approx(by_hand.members["sw"]["f1"], abs=1e-9)
    main(["compose", "--lang", "sw", "--task", "ner", "--base", env["base"], "--fallback", "related",
          "--eval-data", str(rw)])  # a target with its own module: no fallback, nothing said about one
    captured = capsys.readouterr()
    assert "--fallback" not in captured.err and "sw language module + task module" in captured.out


def test_fallback_related_refuses_a_target_nothing_is_related_to(env, capsys):
    from tests.test_cli import assert_one_error_line, run_cli

    code, _, err = run_cli(capsys, "compose", "--lang", "km", "--task", "ner", "--base", env["base"],
                           "--fallback", "related")
    assert_one_error_line(code, err, "no language with a registered module shares a genus, family or script with km",
                          "modules exist for: en, sw")
