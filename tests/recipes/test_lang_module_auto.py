"""``lang_module=auto`` pairs a task module with the language module of its own method, and the zero-shot
baseline uses the task module's recorded parent, never a fresh lookup (issue 14, defect 5)."""

import pytest

from tests.conftest import EN_WORDS, make_lines
from xlpeft import load_module, tracking
from xlpeft.lineage import baseline_language_module
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.recipes.train_task import TaskRequest, train_task

SMALL = {"sft": {"num_params": "1500"}}  # LT-SFT's default K is larger than a tiny base


@pytest.fixture
def en_corpus(tmp_path):
    path = tmp_path / "en.txt"
    path.write_text("\n".join(make_lines(EN_WORDS, 120)), encoding="utf-8")
    return path


def _lang(base_dir, corpus, method, seed=None):
    return train_language(LangRequest(lang="en", method=method, base=str(base_dir), corpus=(str(corpus),),
                                      sets={"max_steps": "2", "max_seq_len": "32", **SMALL.get(method, {}),
                                            **({"seed": str(seed)} if seed is not None else {})}))


def _task(base_dir, ner_files, method, **sets):
    return train_task(TaskRequest(task="ner", lang="en", method=method, base=str(base_dir),
                                  train_data=str(ner_files["train"]), eval_data=str(ner_files["eval"]),
                                  output=f"modules/task-ner-{method}",
                                  sets={"max_steps": "2", "batch_size": "8", "max_seq_len": "48",
                                        **SMALL.get(method, {}), **sets}))


def test_auto_prefers_the_same_method_and_says_so(workdir, base_dirs, en_corpus, ner_files, capsys):
    base_dir = base_dirs["tiny-bert"]
    adapter = _lang(base_dir, en_corpus, "adapter")
    sft = _lang(base_dir, en_corpus, "sft")  # registered after the adapter: the old `auto` took it for everything
    capsys.readouterr()
    for method, parent in (("adapter", adapter), ("sft", sft)):
        result = _task(base_dir, ner_files, method)
        err = capsys.readouterr().err
        assert f"lang_module=auto: xlpeft-lang-en-{method} version 1 (the {method} language module" in err
        lineage = load_module(result.path).manifest.extra["lang_module"]
        assert lineage["registered_name"] == f"xlpeft-lang-en-{method}" and lineage["run_id"] == parent.run_id
        assert lineage["picked"] == "same method"
        tags = tracking.client().get_run(result.run_id).data.tags
        assert tags["xlpeft.parent.lang_module"] == f"xlpeft-lang-en-{method} v1"
        assert tags["xlpeft.parent.lang_method"] == method


def test_auto_falls_back_to_another_method_with_a_message(workdir, base_dirs, en_corpus, ner_files, capsys):
    base_dir = base_dirs["tiny-bert"]
    _lang(base_dir, en_corpus, "sft")
    capsys.readouterr()
    result = _task(base_dir, ner_files, "adapter")
    err = capsys.readouterr().err
    assert "lang_module=auto: xlpeft-lang-en-sft version 1 (no adapter language module for 'en'" in err
    assert "--method adapter" in err
    assert load_module(result.path).manifest.extra["lang_module"]["picked"].startswith("other method")


def test_baseline_is_the_recorded_parent_not_the_newest(workdir, base_dirs, en_corpus, ner_files):
    base_dir = base_dirs["tiny-bert"]
    parent = _lang(base_dir, en_corpus, "adapter")
    task = load_module(_task(base_dir, ner_files, "adapter").path)
    unrelated = load_module(_task(base_dir, ner_files, "sft", lang_module="none").path)
    parent_seed = load_module(parent.path).manifest.training["seed"]
    newer = _lang(base_dir, en_corpus, "adapter", seed=parent_seed + 1)  # registered after the task module
    _lang(base_dir, en_corpus, "sft")
    assert newer.version == "2"
    fingerprint = task.manifest.base["fingerprint"]
    found = baseline_language_module(task, fingerprint)
    assert found is not None and found.manifest.method == "adapter"
    assert found.manifest.training["seed"] == parent_seed  # version 1, the parent; not the newer version 2
    # a task module trained without a language module has no baseline parent (the old code looked one up)
    assert baseline_language_module(unrelated, fingerprint) is None
