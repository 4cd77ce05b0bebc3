"""Registry hygiene and the lineage the MLflow UI shows: version descriptions, registered-model tags,
aliases (`xlpeft promote`, NAME@ALIAS), dataset inputs with digests, the source tag, the experiment
kind, and the evaluation matrix as an MLflow table. Tiny bases, one SQLite store per module.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.conftest import EN_WORDS, SW_WORDS, make_lines, make_ner, use_store, write_conll
from tests.test_cli import assert_one_error_line
from tests.test_tracking import Flaky
from xlpeft import tracking
from xlpeft.cli import main
from xlpeft.errors import XlpeftError
from xlpeft.matrix import Matrix
from xlpeft.recipes.compose import ComposeRequest, compose_task
from xlpeft.recipes.evaluate import TABLE_FILE, evaluate_matrix, seed_table_rows
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.recipes.train_task import TaskRequest, train_task
from xlpeft.seeds import SeedTable
from xlpeft.tracking import RETRY_ENV, registration, replay_spool, spool_path, tracked_run
from xlpeft.tracking.run import source_tags
from xlpeft.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

LANG, TASK = "xlpeft-lang-sw-adapter", "xlpeft-task-ner-adapter"


@pytest.fixture(scope="module")
def store(tmp_path_factory, base_dirs):
    """en/sw language adapters, an English NER task adapter over en, and a registered ner-sw composition."""
    root = tmp_path_factory.mktemp("hygiene")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        base = str(base_dirs["tiny-bert"])
        results = {}
        for lang, words in (("en", EN_WORDS), ("sw", SW_WORDS)):
            corpus = root / f"{lang}.txt"
            corpus.write_text("\n".join(make_lines(words, 120)), encoding="utf-8")
            results[lang] = train_language(LangRequest(lang=lang, base=base, corpus=(str(corpus),),
                                                       sets={"max_steps": "3", "max_seq_len": "32"}))
        write_conll(root / "train.conll", make_ner(60, seed=1))
        write_conll(root / "eval.conll", make_ner(20, seed=2))
        write_conll(root / "sw.conll", make_ner(16, seed=5))
        results["ner"] = train_task(TaskRequest(task="ner", base=base, train_data=str(root / "train.conll"),
                                                eval_data=str(root / "eval.conll"),
                                                sets={"max_steps": "3", "batch_size": "16", "max_seq_len": "48"}))
        results["composition"] = compose_task(ComposeRequest(lang="sw", task="ner", base=base, register=True,
                                                             eval_data=str(root / "sw.conll")))
        yield {"root": root, "base": base, "results": results}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one xlpeft command (``main`` returns on success)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def env(store, monkeypatch):
    use_store(monkeypatch, store["root"])
    return store


# ---- descriptions and registered-model tags


def test_versions_are_described_and_names_tagged(env):
    c = tracking.client()
    lang = c.get_model_version(LANG, "1")
    first, *rest = lang.description.splitlines()
    assert first.startswith("language module sw · adapter · base ") and "3 steps" in first and "eval_loss" in first
    assert f"- trained on: {env['root'] / 'sw.txt'}" in rest
    assert "- parent modules: none (trained on the bare base)" in rest
    task = c.get_model_version(TASK, "1")
    assert task.description.startswith("task module ner (trained on en) · adapter")
    assert "f1" in task.description.splitlines()[0]
    assert "- parent modules: xlpeft-lang-en-adapter v1" in task.description.splitlines()
    assert c.get_registered_model(LANG).tags == {
        "xlpeft.kind": "language", "xlpeft.lang": "sw", "xlpeft.lang_name": "Swahili", "xlpeft.method": "adapter",
        "xlpeft.base": env["base"]}
    assert c.get_registered_model(TASK).tags == {"xlpeft.kind": "task", "xlpeft.task": "ner",
                                                 "xlpeft.method": "adapter", "xlpeft.base": env["base"]}
    comp = c.get_registered_model("xlpeft-ner-sw")
    assert comp.tags["xlpeft.kind"] == "composition" and comp.tags["xlpeft.lang"] == "sw"
    desc = c.get_model_version("xlpeft-ner-sw", "1").description
    assert desc.startswith("composition ner in sw · adapter+adapter") and "mlflow.pyfunc.load_model" in desc


def test_a_repeated_registration_neither_duplicates_nor_loses_the_description(env):
    c = tracking.client()
    run_id = env["results"]["sw"].run_id
    version = c.get_model_version(LANG, "1")
    for text in ("new text", version.description):  # then back: the store is shared by this file's tests
        again = registration.register_version(c, run_id, LANG, "module", dict(version.tags),
                                              str(env["results"]["sw"].path), text)
        assert again == "1" and len(c.search_model_versions(f"name='{LANG}'")) == 1
        assert c.get_model_version(LANG, "1").description == text


# ---- lineage the UI shows


def test_runs_carry_dataset_inputs_with_digests(env):
    c = tracking.client()
    lang_run = c.get_run(env["results"]["sw"].run_id)
    (ds,) = lang_run.inputs.dataset_inputs
    corpus = env["root"] / "sw.txt"
    sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert (ds.dataset.name, ds.dataset.digest, ds.dataset.source_type) == ("sw.txt", sha[:16], "local")
    assert json.loads(ds.dataset.source) == {"uri": str(corpus.resolve())}
    assert json.loads(ds.dataset.profile)["sha256"] == sha
    assert {t.key: t.value for t in ds.tags} == {"mlflow.data.context": "train"}
    task_run = c.get_run(env["results"]["ner"].run_id)
    contexts = {d.dataset.name: {t.key: t.value for t in d.tags}["mlflow.data.context"]
                for d in task_run.inputs.dataset_inputs}
    assert contexts == {"train.conll": "train", "eval.conll": "eval"}
    rows = {d.dataset.name: json.loads(d.dataset.profile)["rows"] for d in task_run.inputs.dataset_inputs}
    assert rows == {"train.conll": 60, "eval.conll": 20}


def test_hub_specs_are_digested_by_spec_and_revision():
    a = registration.dataset_record("train", "hf:wikiann:sw:train", hf="wikiann")
    b = registration.dataset_record("train", "hf:wikiann:sw:train", hf="wikiann", revision="abc123")
    assert a["source_type"] == "hugging_face" and a["name"] == "wikiann"
    assert a["digest"] == hashlib.sha256(b"hf:wikiann:sw:train\0").hexdigest()[:16] != b["digest"]
    assert json.loads(b["source"]) == {"path": "wikiann", "revision": "abc123"}


def test_runs_name_the_command_line_and_the_experiment_opens_on_its_runs(env):
    c = tracking.client()
    run = c.get_run(env["results"]["sw"].run_id)
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.source.name"]
    assert source_tags(["/venv/bin/xlpeft", "train-lang", "--lang", "sw", "--corpus", "my corpus.txt"]) == {
        "mlflow.source.name": "xlpeft train-lang --lang sw --corpus 'my corpus.txt'", "mlflow.source.type": "LOCAL"}
    exp = c.get_experiment_by_name(tracking.EXPERIMENT)
    assert (EXPERIMENT_KIND_TAG, EXPERIMENT_KIND) == ("mlflow.experimentKind", "custom_model_development")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_an_experiment_created_before_gets_the_kind_and_a_chosen_kind_is_kept(workdir):
    c = tracking.client()
    exp_id = c.create_experiment(tracking.EXPERIMENT)
    with tracked_run("r", {}, {}):
        pass
    assert c.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    c.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "genai_development")
    with tracked_run("r2", {}, {}):
        pass
    assert c.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_the_evaluation_matrix_is_an_mlflow_table_next_to_the_heatmap(env):
    matrix, run_id = evaluate_matrix("ner", ["sw"], env["base"], eval_dir=str(env["root"]))
    c = tracking.client()
    paths = {a.path for a in c.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/matrix.png", TABLE_FILE} <= paths
    assert json.loads(c.get_run(run_id).data.tags["mlflow.loggedArtifacts"]) == [{"path": TABLE_FILE, "type": "table"}]
    exp_id = c.get_run(run_id).info.experiment_id
    table = c.load_table(exp_id, TABLE_FILE, run_ids=[run_id])  # MLflow reads it as one of its own tables
    assert list(table.columns) == ["lang", "adapter+adapter", "baseline+adapter"]
    assert table.iloc[0]["lang"] == "sw"
    assert table.iloc[0]["adapter+adapter"] == pytest.approx(matrix.rows["sw"]["adapter+adapter"])


def test_table_rows_of_a_matrix_and_of_seeds():
    m = Matrix("f1", {"sw": {"adapter+adapter": 0.5, "baseline+adapter": 0.25}, "yo": {"baseline+adapter": 0.1}}, {})
    assert m.table() == (["lang", "adapter+adapter", "baseline+adapter"],
                         [["sw", 0.5, 0.25], ["yo", None, 0.1]])
    seeds = SeedTable("f1", [1, 2], {"sw": {"adapter+adapter": [0.4, 0.6]}}, {}, {})
    cols, rows = seed_table_rows(seeds)
    assert cols == ["lang", "adapter+adapter mean", "adapter+adapter std"]
    assert rows[0][0] == "sw" and rows[0][1] == pytest.approx(0.5)


# ---- aliases


def test_promote_sets_an_alias_that_every_lookup_and_modules_show(env, capsys):
    code, out, _ = run_cli(capsys, "promote", LANG, "1", "--alias", "production")
    assert code == 0 and out.strip() == f"{LANG}@production -> v1; use it as {LANG}@production"
    path, reg = tracking.find_reference(f"{LANG}@production")
    assert (reg.version, reg.aliases) == ("1", ("production",)) and (path / "xlpeft.json").is_file()
    assert tracking.find_reference(f"{LANG}@latest")[1].version == "1"
    code, out, _ = run_cli(capsys, "promote", LANG, "1", "--alias", "production")
    assert "(unchanged)" in out
    code, out, _ = run_cli(capsys, "modules")
    line = next(i for i, text in enumerate(out.splitlines()) if text.startswith(f"{LANG} v1 @production  base="))
    assert out.splitlines()[line + 1].startswith("    language module sw · adapter")
    with pytest.raises(XlpeftError, match=r"has no alias 'staging'; its aliases: @production \(v1\)"):
        tracking.find_reference(f"{LANG}@staging")


def test_a_task_module_trains_over_a_language_module_named_by_alias(env):
    from xlpeft.lineage import language_module_for_task
    from xlpeft.models import load_base

    tracking.promote(LANG, "1", "candidate")
    base = load_base(env["base"])
    module, lineage = language_module_for_task(f"{LANG}@candidate", "en", base, "adapter")
    assert module.manifest.lang == "sw"  # the named module, not the newest for the task's language
    assert (lineage["registered_name"], lineage["version"], lineage["picked"]) == (LANG, "1", f"{LANG}@candidate")
    with pytest.raises(XlpeftError, match="has no alias 'canary'"):
        language_module_for_task(f"{LANG}@canary", "en", base, "adapter")


@pytest.mark.parametrize(("args", "needles"), [
    ((LANG, "1", "--alias", "latest"), ("alias 'latest' is reserved",)),
    ((LANG, "1", "--alias", "v2"), ("alias 'v2' is reserved",)),
    ((LANG, "1", "--alias", "pro duction"), ("only letters, digits",)),
    ((LANG, "7", "--alias", "production"), (f"{LANG} has no version '7'; its versions: 1",)),
    (("xlpeft-lang-yo-adapter", "1", "--alias", "production"), ("no registered model xlpeft-lang-yo-adapter", LANG)),
])
def test_promote_refuses_with_one_line(env, capsys, args, needles):
    code, _, err = run_cli(capsys, "promote", *args)
    assert_one_error_line(code, err, *needles)


def test_a_composition_name_where_a_module_is_expected_says_how_to_use_it(env, capsys):
    with pytest.raises(XlpeftError, match=r"xlpeft-ner-sw is a registered composition .*"
                                          r"mlflow\.pyfunc\.load_model\('models:/xlpeft-ner-sw@latest'\)"):
        tracking.find_reference("xlpeft-ner-sw")
    code, _, err = run_cli(capsys, "compose", "--lang", "sw", "--task", "ner", "--base", env["base"],
                           "--module", "xlpeft-ner-sw@1")
    assert_one_error_line(code, err, "is a registered composition", "xlpeft.mlflow.load_model")
    with pytest.raises(XlpeftError, match="is not an xlpeft registered name"):
        tracking.find_reference("xlpeft-nothing-here")  # not registered: the usual message


# ---- through the spool


@pytest.fixture
def down(workdir, monkeypatch) -> Flaky:
    """Runs opened by tracked_run (and replays) go through a client that fails while ``down`` is set."""
    wrapper = Flaky(tracking.client())
    monkeypatch.setattr("xlpeft.tracking.run.client", lambda uri=None: wrapper)
    monkeypatch.setattr("xlpeft.tracking.spool.client", lambda uri=None: wrapper)
    return wrapper


def test_inputs_tables_and_descriptions_survive_an_outage_and_replay_once(down, tmp_path, monkeypatch):
    monkeypatch.setenv(RETRY_ENV, "0")
    module_dir = tmp_path / "module"
    module_dir.mkdir()
    (module_dir / "xlpeft.json").write_text("{}", encoding="utf-8")
    data = tmp_path / "c.txt"
    data.write_text("hello\n", encoding="utf-8")
    tags = {"xlpeft.kind": "language", "xlpeft.lang": "sw", "xlpeft.method": "adapter"}
    with pytest.raises(tracking.TrackingUnfinished):
        with tracked_run("outage", tags, {}) as tr:
            down.down = True
            tr.log_inputs([registration.dataset_record("train", str(data), data)])
            tr.log_artifacts(module_dir, "module")
            tr.log_table(["lang", "x"], [["sw", float("nan")]], "evaluation/t.json")
            tr.register(LANG, "module", tags, description="described")
    run_id = tr.run_id
    saved = spool_path(run_id).read_text(encoding="utf-8")
    assert [json.loads(line)["op"] for line in saved.splitlines()] == [
        "run", "inputs", "artifacts", "table", "register", "terminate"]
    down.down = False
    assert replay_spool(run_id) == "1"
    spool_path(run_id).write_text(saved, encoding="utf-8")  # a replay whose answer was lost is repeated
    assert replay_spool(run_id) == "1"
    c = tracking.client()
    run = c.get_run(run_id)
    assert len(run.inputs.dataset_inputs) == 1
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "evaluation/t.json", "type": "table"}]
    local = c.download_artifacts(run_id, "evaluation/t.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read()) == {"columns": ["lang", "x"], "data": [["sw", None]]}  # NaN is not JSON
    (version,) = c.search_model_versions(f"name='{LANG}'")
    assert version.description == "described"
    assert c.get_registered_model(LANG).tags == tags
    with tracked_run("again", tags, {}, run_id=run_id) as tr:
        tr.log_table(["lang", "x"], [["sw", 1.0]], "evaluation/t.json")  # replaced, not appended as log_table does
    local = c.download_artifacts(run_id, "evaluation/t.json", str(tmp_path / "dl2"))
    assert json.loads(open(local).read()) == {"columns": ["lang", "x"], "data": [["sw", 1.0]]}


def test_the_ui_link_opens_the_runs_table_of_the_experiment(workdir):
    from xlpeft.tracking.__main__ import ui_url

    c = tracking.client()
    url = ui_url("127.0.0.1:5999")
    exp = c.get_experiment_by_name(tracking.EXPERIMENT)
    assert url == f"http://127.0.0.1:5999/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
