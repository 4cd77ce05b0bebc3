"""Pipelines: variables and --var, fan-out, the dry run, and skipping a step a finished run already did.

The skip test trains tiny modules through ``xlpeft run`` in a temporary MLflow store, runs the
same pipeline again (skipped), with a changed variable (runs, and so does the task step over the
retrained language module) and with --force (runs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import EN_WORDS, make_lines, make_ner, write_conll
from tests.hostile.conftest import run_cli, runs_by_status
from xlpeft.errors import XlpeftError
from xlpeft.pipelines import load_pipeline, parse_vars

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    return path


VARS = """\
vars:
  base: xlmr        # the base
  langs: sw,yo      # targets
  listed: [a, b]    # a YAML list
  steps: 100        # a number
steps:
  - [train-lang, --lang, sw, --base, "${base}", --max-steps, "${steps}"]
  - "evaluate --task ner --langs ${langs} --base ${base}"
  - [evaluate, --task, ner, --langs, "${listed}", --base, "x$${base}"]
"""


def test_variables_are_substituted_and_overridden(tmp_path):
    pipeline = load_pipeline(write(tmp_path, VARS))
    assert [s.args for s in pipeline.steps] == [
        ("train-lang", "--lang", "sw", "--base", "xlmr", "--max-steps", "100"),
        ("evaluate", "--task", "ner", "--langs", "sw,yo", "--base", "xlmr"),
        ("evaluate", "--task", "ner", "--langs", "a,b", "--base", "x${base}"),  # a list joins; $${ is literal
    ]
    over = load_pipeline(write(tmp_path, VARS), parse_vars(["base=mbert", "steps=7", "listed=c"]))
    assert over.steps[0].args[4:] == ("mbert", "--max-steps", "7")
    assert over.steps[2].args[4] == "c"
    assert over.variables["base"] == "mbert"


def test_unknown_var_names_it_and_lists_the_defined_ones(tmp_path):
    with pytest.raises(XlpeftError) as exc:
        load_pipeline(write(tmp_path, VARS), {"bsae": "mbert"})
    assert "--var bsae" in str(exc.value) and "base, langs, listed, steps" in str(exc.value)


@pytest.mark.parametrize("pair", ["base", "=x", "two words=x"])
def test_malformed_var_shows_the_form(pair):
    with pytest.raises(XlpeftError, match="NAME=VALUE"):
        parse_vars([pair])


def test_undefined_variables_are_one_error_naming_each(tmp_path):
    path = write(tmp_path, VARS.replace('"${base}"', '"${bas}"').replace("${langs}", "${lang}"))
    with pytest.raises(XlpeftError) as exc:
        load_pipeline(path)
    message = str(exc.value)
    assert "${bas}, ${lang}" in message and "defined: base, langs, listed, steps" in message


FAN_OUT = """\
vars:
  langs: sw,yo,ha   # targets
  base: xlmr        # the base
steps:
  - [prepare-base, "${base}"]
  - for_each: {lang: "${langs}"}
    run: [train-lang, --lang, "${lang}", --base, "${base}"]
  - for_each: {lang: [en, "${base}"], method: "adapter, sft"}
    run: "compose --lang ${lang} --task ner --lang-method ${method}"
"""


def test_fan_out_expands_in_order_first_key_outermost(tmp_path):
    steps = load_pipeline(write(tmp_path, FAN_OUT)).steps
    assert [s.number for s in steps] == [1, 2, 2, 2, 3, 3, 3, 3]
    assert [s.args[2] for s in steps[1:4]] == ["sw", "yo", "ha"]
    assert [(s.args[2], s.args[-1]) for s in steps[4:]] == [("en", "adapter"), ("en", "sft"), ("xlmr", "adapter"),
                                                           ("xlmr", "sft")]
    assert steps[4].bindings == (("lang", "en"), ("method", "adapter"))
    over = load_pipeline(write(tmp_path, FAN_OUT), {"langs": "ig"}).steps
    assert [s.args[2] for s in over if s.args[0] == "train-lang"] == ["ig"]


@pytest.mark.parametrize("step, needle", [
    ('{for_each: {lang: ""}, run: [evaluate]}', "for_each lang is empty"),
    ('{for_each: {base: [a]}, run: [evaluate]}', "loop variable base is also a pipeline variable"),
    ('{for_each: [a, b], run: [evaluate]}', "`for_each` should map a loop variable"),
    ('{for_each: {lang: [a]}, command: [evaluate]}', "takes `run`"),
    ('{for_each: {lang: [a]}, run: [run, x.yaml]}', "nests `run`"),
])
def test_malformed_fan_out_is_one_clear_error(tmp_path, step, needle):
    with pytest.raises(XlpeftError, match="step 1") as exc:
        load_pipeline(write(tmp_path, f"vars:\n  base: x  # b\nsteps:\n  - {step}\n"))
    assert needle in str(exc.value)


def test_dry_run_shows_every_expanded_step_offline(capsys, workdir):
    outcome = run_cli(capsys, "run", str(ROOT / "pipelines" / "madx.yaml"), "--var", "langs=sw,yo", "--dry-run")
    assert outcome.code == 0, outcome.err
    lines = outcome.out.splitlines()
    commands = [line.split("] ", 1)[1] for line in lines if line.startswith("[")]
    assert [c.split()[1] for c in commands] == ["train-lang"] * 3 + ["train-task"] + ["compose"] * 2 + ["evaluate"]
    assert [c.split("--lang ")[1].split()[0] for c in commands[:3]] == ["en", "sw", "yo"]
    assert "--output modules/madx/lang-sw-adapter" in commands[1] and "(step 1: lang=sw)" in commands[1]
    decisions = [line.strip() for line in lines if line.startswith("    ")]
    assert decisions == ["would run"] * 4 + ["runs (cannot tell whether done)"] * 3
    assert lines[0].startswith("pipeline madx") and "langs=sw,yo" in lines[0]
    assert runs_by_status() == {}  # nothing ran


def _pipeline(root: Path, base: str) -> Path:
    (root / "en.txt").write_text("\n".join(make_lines(EN_WORDS, 120, seed=3)) + "\n", encoding="utf-8")
    write_conll(root / "train.conll", make_ner(40, seed=1))
    write_conll(root / "eval.conll", make_ner(12, seed=2))
    return write(root, f"""\
vars:
  base: {base}   # the tiny base
  steps: 2       # language-module steps
steps:
  - [train-lang, --lang, en, --base, "${{base}}", --corpus, en.txt, --max-steps, "${{steps}}", --set, max_seq_len=32]
  - [train-task, --task, ner, --base, "${{base}}", --train-data, train.conll, --eval-data, eval.conll,
     --max-steps, 2, --set, max_seq_len=32, --set, lang_module=modules/lang-en-adapter]
""")


def _decisions(capsys, path: Path, *extra: str) -> list[str]:
    outcome = run_cli(capsys, "run", str(path), "--dry-run", *extra)
    assert outcome.code == 0, outcome.err
    return [line.strip() for line in outcome.out.splitlines() if line.startswith("    ")]


def _finished() -> int:
    return runs_by_status().get("FINISHED", 0)


def test_a_step_done_with_the_same_configuration_is_skipped(capsys, workdir, base_dirs):
    from xlpeft import tracking

    path = _pipeline(workdir, str(base_dirs["tiny-bert"]))
    assert run_cli(capsys, "run", str(path)).code == 0
    assert _finished() == 2
    lang_run = tracking.list_versions("xlpeft-lang-en-adapter")[0].run_id
    skips = _decisions(capsys, path)
    assert skips[0] == f"skip: done in run {lang_run} (registered xlpeft-lang-en-adapter v1)"
    assert skips[1].startswith("skip: done in run ") and "(registered xlpeft-task-ner-adapter v1)" in skips[1]

    manifest = (workdir / "modules" / "lang-en-adapter" / "xlpeft.json").read_bytes()
    shutil.rmtree(workdir / "modules" / "lang-en-adapter")  # the output is restored from the registered version
    outcome = run_cli(capsys, "run", str(path))
    assert outcome.code == 0 and "restores" in outcome.err and _finished() == 2, outcome.err
    assert (workdir / "modules" / "lang-en-adapter" / "xlpeft.json").read_bytes() == manifest

    # another value of a logged param: the language step runs, and so does the task step over its new module
    assert _decisions(capsys, path, "--var", "steps=3")[0] == "would run (no finished run logged this configuration)"
    assert run_cli(capsys, "run", str(path), "--var", "steps=3").code == 0
    assert _finished() == 4
    assert [v.version for v in tracking.list_versions("xlpeft-task-ner-adapter")] == ["2", "1"]

    assert _decisions(capsys, path, "--var", "steps=3", "--force") == ["would run (--force)"] * 2
    assert run_cli(capsys, "run", str(path), "--var", "steps=3", "--no-skip").code == 0
    assert _finished() == 6


def test_a_setting_added_since_a_run_keeps_it_done_while_at_its_default(capsys, workdir, base_dirs, monkeypatch):
    """Upgrading xlpeft (a TrainConfig field more) must not make every finished step of a pipeline run again."""
    import dataclasses

    import xlpeft.recipes.train_lang as recipe

    path = _pipeline(workdir, str(base_dirs["tiny-bert"]))
    assert run_cli(capsys, "run", str(path)).code == 0
    real_plan, real_defaults = recipe.plan_language, recipe.LangPlan.param_defaults
    value = {"now": "7"}

    def newer_plan(req):  # this version logs one setting more than the version that trained the module
        plan = real_plan(req)
        return dataclasses.replace(plan, params={**plan.params, "train": {**plan.params["train"], "added": value["now"]}})

    monkeypatch.setattr(recipe, "plan_language", newer_plan)
    monkeypatch.setattr(recipe.LangPlan, "param_defaults", property(lambda self: {**real_defaults.fget(self),
                                                                                   "train.added": "7"}))
    assert _decisions(capsys, path)[0].startswith("skip: done in run ")  # at its default: the earlier run did the same
    value["now"] = "8"
    assert _decisions(capsys, path)[0] == "would run (no finished run logged this configuration)"


def test_param_differences_reads_predating_settings_by_their_defaults_and_corpora_by_content():
    from xlpeft.config import TrainConfig
    from xlpeft.tracking.lifecycle import config_defaults, param_differences

    defaults = config_defaults(train=TrainConfig)
    assert defaults["train.new_token_unit"] == "word" and defaults["train.lr"] == str(TrainConfig().lr)
    mine = {"train": {"lr": 1e-3, "new_token_unit": "word"}, "corpora": "/new/place/sw.txt", "corpus_fingerprint": "ab"}
    logged = {"train.lr": "0.001", "corpora": "/old/place/sw.txt", "corpus_fingerprint": "ab"}
    assert param_differences(mine, logged, defaults) == []
    assert param_differences(mine, logged) == ["train.new_token_unit"]  # without defaults: a key more is a difference
    piece = {**mine, "train": {"lr": 1e-3, "new_token_unit": "piece"}}
    assert param_differences(piece, logged, defaults) == ["train.new_token_unit"]
    assert param_differences({**mine, "corpus_fingerprint": "cd"}, logged, defaults) == ["corpora", "corpus_fingerprint"]
    checked = {**mine, "train": {"lr": 1e-3, "new_token_unit": "word", "activation_checkpointing": True}}
    assert param_differences(checked, {**logged, "train.activation_checkpointing": "False"}) == ["train.new_token_unit"]
