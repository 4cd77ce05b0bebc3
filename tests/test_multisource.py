"""Multi-source task training (issue 22): the language switch is exact for every language method, the
per-source draw is seeded and resumable, the recipe trains over every source's module and leaves every
module and the base bit-identical, and bad configurations fail before a run opens, naming the source."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import EN_WORDS, SW_WORDS, make_lines, make_ner, use_store, write_conll
from xlpeft import load_module, tracking
from xlpeft.compose import activate
from xlpeft.config import TrainConfig
from xlpeft.data.batches import ExampleBatches, SourceBatches
from xlpeft.data.tasks import Encoded
from xlpeft.errors import XlpeftError
from xlpeft.models import load_base
from xlpeft.multisource import LanguageSwitch, sampling_probabilities
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.recipes.train_task import TaskRequest, plan_task, train_task
from xlpeft.registry import get_method

# Language-module methods and the settings that keep them tiny; "lora" applies merged (into the weights), so it
# and "sft" are the swapped-in-place rows; "lora_hooked" is the same method applied by hooks.
LANG_ROWS = {"adapter": ("adapter", {}), "sft": ("sft", {"num_params": "3000"}), "lora": ("lora", {}),
             "lora_hooked": ("lora", {"merge": "false"}), "ia3": ("ia3", {}), "prefix": ("prefix", {}),
             "compacter": ("compacter", {"reduction_factor": "4"}), "parallel": ("parallel", {}), "mam": ("mam", {})}
SMALL = {"max_steps": "4", "max_seq_len": "32", "lr": "1e-2"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, base_dirs):
    """en and sw language modules of every row's method on tiny-bert, and NER data for both languages."""
    root = tmp_path_factory.mktemp("multisource")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        base = str(base_dirs["tiny-bert"])
        for lang, words in (("en", EN_WORDS), ("sw", SW_WORDS)):
            corpus = root / f"{lang}.txt"
            corpus.write_text("\n".join(make_lines(words, 120)), encoding="utf-8")
            for row, (method, extra) in LANG_ROWS.items():
                train_language(LangRequest(lang=lang, method=method, base=base, corpus=(str(corpus),),
                                           sets={**SMALL, **extra}, output=str(root / f"lang-{lang}-{row}")))
        write_conll(root / "en.conll", make_ner(64, seed=1))
        write_conll(root / "sw.conll", make_ner(24, seed=2))
        yield {"root": root, "base": base}


@pytest.fixture
def env(store, monkeypatch):
    use_store(monkeypatch, store["root"])
    return store


def _batch(base, n=3, t=10):
    ids = torch.randint(5, len(base.tokenizer), (n, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hidden(base, batch):
    with torch.no_grad():
        return base.model.base_model(**batch).last_hidden_state


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("task_method", ["adapter", "prefix"])  # prefix: shares its sites with prefix/mam languages
@pytest.mark.parametrize("row", list(LANG_ROWS))
def test_the_switch_gives_exactly_the_one_language_stack_under_a_task_module(env, row, task_method):
    """For every language method: switched to L under a task module's hooks = L activated alone under it, bit for bit."""
    base = load_base(env["base"])
    en, sw = (load_module(env["root"] / f"lang-{lang}-{row}") for lang in ("en", "sw"))
    batch, theta0, hooks0 = _batch(base), _params(base.model), _hooks(base.model)
    task = get_method(task_method)
    cfg = TrainConfig(max_steps=1)
    expected = {}
    for lang, module in (("en", en), ("sw", sw)):
        active = activate(base, [module])
        torch.manual_seed(0)
        trainable = task.prepare(base, task.config_cls(), cfg)
        for p in trainable.begin_phase(trainable.phases[0]):
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(3))  # a non-identity task module
        state = trainable.state_dict()
        expected[lang] = _hidden(base, batch)
        trainable.close()
        active.remove()
    switch = LanguageSwitch(base, {"en": en, "sw": sw})
    switch.to("en")
    torch.manual_seed(0)
    trainable = task.prepare(base, task.config_cls(), cfg)
    trainable.resume_phase(trainable.phases[0], state)
    try:
        for lang in ("sw", "en", "sw", "sw", "en"):  # every swap direction, and a repeat (a no-op)
            switch.to(lang)
            assert torch.equal(_hidden(base, batch), expected[lang]), f"{row}: under {lang}"
        assert switch.merged == (["en", "sw"] if row in ("sft", "lora") else []), "which rows swap in the weights"
    finally:
        trainable.close()
        switch.remove()
    switch.remove()  # twice is safe
    assert _hooks(base.model) == hooks0, "every gated hook is taken off"
    assert all(torch.equal(p, theta0[n]) for n, p in base.model.named_parameters()), "the base is restored exactly"
    assert not torch.equal(expected["en"], expected["sw"]), "the two language modules differ (the check could fail)"


def test_sampling_probabilities():
    assert sampling_probabilities([300, 100], "proportional", 1.0) == pytest.approx([0.75, 0.25])
    flat = sampling_probabilities([300, 100], "proportional", 1e6)
    assert flat == pytest.approx([0.5, 0.5], abs=1e-5)
    assert sampling_probabilities([40000, 900], "uniform", 1.0) == [0.5, 0.5]
    t3 = sampling_probabilities([40000, 900], "proportional", 3.3)
    assert 0.5 < t3[0] < 40000 / 40900, "a temperature above 1 flattens towards uniform"
    with pytest.raises(XlpeftError, match="at least one training example"):
        sampling_probabilities([10, 0], "proportional", 1.0)


def _source_batches(seed=0):
    offset = {"en": 10, "sw": 100}  # every example's middle id says which source it is from
    enc = {lang: Encoded(input_ids=[[1, i + offset[lang], 2] for i in range(n)],
                         labels=[[-100, i % 3, -100] for i in range(n)], words=[[1] for _ in range(n)])
           for lang, n in (("en", 30), ("sw", 7))}
    per = {lang: ExampleBatches(e, len(e.input_ids), 4, 0, torch.Generator().manual_seed(seed + i))
           for i, (lang, e) in enumerate(enc.items())}
    return SourceBatches(per, [0.6, 0.4], torch.Generator().manual_seed(seed)), enc


def test_source_batches_draw_by_probability_and_resume_exactly():
    data, enc = _source_batches()
    langs = []
    for _ in range(200):
        batch = next(data)
        langs.append(data.current)
        ids = set(batch["input_ids"][:, 1].tolist())
        own = {row[1] for row in enc[data.current].input_ids}
        assert ids <= own, "a batch holds examples of its source only"
    assert 0.5 < langs.count("en") / 200 < 0.7
    # resume: the state after k batches continues exactly as the uninterrupted iterator
    a, _ = _source_batches()
    for _ in range(13):
        next(a)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    rest = [(next(a)["input_ids"], a.current) for _ in range(20)]
    b, _ = _source_batches(seed=5)  # other seeds: everything comes from the state
    b.load_state_dict(state)
    again = [(next(b)["input_ids"], b.current) for _ in range(20)]
    assert [lang for _, lang in rest] == [lang for _, lang in again]
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(rest, again, strict=True))


def _sets(**extra):
    return {"max_steps": "12", "batch_size": "8", "max_seq_len": "48", "lr": "3e-3", **extra}


def _module_tensors(path):
    return {f"{s}/{k}": v.clone() for s, state in load_module(path).tensors.items() for k, v in state.items()}


@pytest.mark.parametrize("lang_row,task_method", [("adapter", "adapter"), ("sft", "lora"), ("adapter", "sft"),
                                                  ("ia3", "prefix")])
def test_multi_source_training_trains_over_every_source_and_changes_no_module(env, lang_row, task_method):
    root = env["root"]
    langs = [root / f"lang-{lang}-{lang_row}" for lang in ("en", "sw")]
    before = [_module_tensors(p) for p in langs]
    out = root / f"task-{lang_row}-{task_method}"
    extra = {"num_params": "2000"} if task_method == "sft" else {}
    result = train_task(TaskRequest(task="ner", lang="en,sw", method=task_method, base=env["base"],
                                    train_data=f"{root / 'en.conll'},{root / 'sw.conll'}", output=str(out),
                                    sets=_sets(lang_module=f"{langs[0]},{langs[1]}", sampling="uniform", **extra)))
    for path, tensors in zip(langs, before, strict=True):
        assert _module_tensors(path).keys() == tensors.keys()
        assert all(torch.equal(v, tensors[k]) for k, v in _module_tensors(path).items()), f"{path} unchanged"
    m = load_module(out).manifest
    assert m.lang == "en,sw" and [s["lang"] for s in m.training["sources"]] == ["en", "sw"]
    assert [s["probability"] for s in m.training["sources"]] == [0.5, 0.5]
    assert m.extra["lang_module"]["path"] == str(langs[0].resolve()), "the baseline is over the first source's module"
    assert {"f1", "f1_en", "f1_sw"} <= set(result.metrics)
    assert result.metrics["f1"] == pytest.approx((result.metrics["f1_en"] + result.metrics["f1_sw"]) / 2)
    run = tracking.client().get_run(result.run_id)
    assert re.fullmatch(r"en: \d+ examples, p=0\.5000, over .+, sw: \d+ examples, p=0\.5000, over .+",
                        run.data.params["sources"]), run.data.params["sources"]
    assert run.data.tags["xlpeft.sources"] == "en,sw"


def test_multi_source_swaps_each_batch_to_its_source_module(env, monkeypatch):
    """Every batch's forward runs with its own source's module switched in (the draw decides, the loss follows)."""
    import xlpeft.multisource as ms

    seen = []
    real = ms.LanguageSwitch.to

    def spy(self, lang):
        seen.append(lang)
        return real(self, lang)

    monkeypatch.setattr(ms.LanguageSwitch, "to", spy)
    root = env["root"]
    train_task(TaskRequest(task="ner", lang="en,sw", method="adapter", base=env["base"],
                           train_data=f"{root / 'en.conll'},{root / 'sw.conll'}", output=str(root / "spy"),
                           sets=_sets(max_steps="20", eval_every="0", lang_module=f"{root / 'lang-en-adapter'},"
                                      f"{root / 'lang-sw-adapter'}", temperature="2.0")))
    draws = seen[1:21]  # the first switch is the initial one, before the task module is prepared
    assert set(draws) == {"en", "sw"}, "both sources are drawn within 20 steps"


@pytest.mark.parametrize("sets,train_data,match", [
    ({"lang_module": "none"}, "two", "source en: multi-source training swaps each source's language module"),
    ({"lang_module": "A,B,C"}, "two", "lang_module: expected one value per source language \\(2: en, sw\\)"),
    ({}, "one", "--train-data: expected one value per source language"),
    ({"lang_module": "SFT", "num_params": "2000"}, "two", "merged into the base's weights, and a sft task module"),
    ({"sampling": "random"}, "two", "`sampling` should be one of proportional, uniform"),
    ({"temperature": "0"}, "two", "`temperature` should be > 0"),
])
def test_bad_multi_source_configurations_fail_before_a_run(env, sets, train_data, match):
    root = env["root"]
    data = {"two": f"{root / 'en.conll'},{root / 'sw.conll'}", "one": str(root / "en.conll")}[train_data]
    lang_module = sets.pop("lang_module", f"{root / 'lang-en-adapter'},{root / 'lang-sw-adapter'}")
    if lang_module == "SFT":
        lang_module = f"{root / 'lang-en-sft'},{root / 'lang-sw-sft'}"
    method = "sft" if "num_params" in sets else "adapter"
    with pytest.raises(XlpeftError, match=match):
        train_task(TaskRequest(task="ner", lang="en,sw", method=method, base=env["base"], train_data=data,
                               output=str(root / "bad"), sets=_sets(lang_module=lang_module, **sets)))
    assert not tracking.client().search_runs(
        [e.experiment_id for e in tracking.client().search_experiments()], "tags.`xlpeft.lang` = 'en,sw' and "
        "attributes.status != 'FINISHED'"), "no run was opened"


def test_a_source_without_data_is_named(env, tmp_path):
    root = env["root"]
    missing = tmp_path / "nowhere.conll"
    with pytest.raises(XlpeftError, match="source sw: "):
        train_task(TaskRequest(task="ner", lang="en,sw", base=env["base"], train_data=f"{root / 'en.conll'},{missing}",
                               sets=_sets(lang_module=f"{root / 'lang-en-adapter'},{root / 'lang-sw-adapter'}")))
    with pytest.raises(XlpeftError, match="--lang: expected source language codes.*en twice"):
        train_task(TaskRequest(task="ner", lang="en,en", base=env["base"], sets=_sets()))


def test_one_source_logs_no_sampling_and_refuses_it(env):
    """One source: the multi-source fields stay out of the params (earlier runs stay done), and setting one is an error."""
    root = env["root"]
    req = TaskRequest(task="ner", lang="en", base=env["base"], train_data=str(root / "en.conll"),
                      output=str(root / "single"), sets=_sets(lang_module=str(root / "lang-en-adapter")))
    plan = plan_task(req)
    assert "sampling" not in plan.params["task_config"] and "temperature" not in plan.params["task_config"]
    assert "sources" not in plan.params and "xlpeft.sources" not in plan.tags
    req.sets["temperature"] = "3.3"
    with pytest.raises(XlpeftError, match="--set temperature: applies to multi-source training only"):
        plan_task(req)


@pytest.mark.slow
def test_multi_source_kill_and_resume_equals_uninterrupted(env, tmp_path):
    from tests.recipes.test_resume import _env, _kill_after_checkpoint

    root = env["root"]
    args = ["train-task", "--task", "ner", "--lang", "en,sw", "--base", env["base"], "--train-data",
            f"{root / 'en.conll'},{root / 'sw.conll'}", "--max-steps", "16", "--batch-size", "8",
            "--set", "max_seq_len=48", "--set", "lr=3e-3", "--set", "checkpoint_every=4", "--set", "eval_every=0",
            "--set", f"lang_module={root / 'lang-en-sft'},{root / 'lang-sw-adapter'}", "--method", "lora"]
    ref, out = tmp_path / "ref", tmp_path / "crashed"
    cmd = [sys.executable, "-m", "xlpeft"]
    subprocess.run([*cmd, *args, "--output", str(ref)], env=_env(tmp_path, MLFLOW_TRACKING_URI=
                   f"sqlite:///{tmp_path / 'ref.db'}"), cwd=tmp_path, check=True, capture_output=True, timeout=300)
    _kill_after_checkpoint([*cmd, *args, "--output", str(out)], _env(tmp_path), tmp_path, min_step=8)
    resumed = subprocess.run([*cmd, *args, "--output", str(out), "--resume"], env=_env(tmp_path), cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming MLflow run" in resumed.stderr
    a, b = _module_tensors(ref), _module_tensors(out)
    assert a.keys() == b.keys() and a
    for key, value in a.items():
        assert torch.equal(b[key], value), key
    assert json.loads((out / "xlpeft.json").read_text())["training"]["sources"][1]["lang"] == "sw"
