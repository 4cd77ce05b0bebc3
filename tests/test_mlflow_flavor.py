"""The ``xlpeft`` MLflow flavor: module folders and compositions are MLflow Models whose pyfunc predicts as
``xlpeft predict`` does, on tiny BERT and XLM-R bases; the base is referenced and its fingerprint checked.

One store per base (module scope): en/sw language adapters, an English NER task adapter over en, and the
sw+ner composition registered as ``xlpeft-ner-sw`` (``compose --register``).
"""

import json
import shutil

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.models import Model

from tests.conftest import EN_WORDS, SW_WORDS, make_lines, make_ner, use_store, write_conll
from xlpeft import compose, load_module, tracking
from xlpeft.errors import XlpeftError
from xlpeft.models import load_base
from xlpeft.recipes.compose import ComposeRequest, compose_task
from xlpeft.recipes.predict import predict_lines
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.recipes.train_task import TaskRequest, train_task
from xlpeft.tracking import flavor

SENTENCES = ["Juma met Amina in Nairobi", "", "Kenyatta said that Safaricom works in London City"]
TINY = {"max_seq_len": "48", "lr": "1e-2"}


@pytest.fixture(scope="module", params=["tiny-bert", "tiny-xlmr"])
def store(request, tmp_path_factory, base_dirs):
    root = tmp_path_factory.mktemp(f"flavor-{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        base = str(base_dirs[request.param])
        for lang, words in (("en", EN_WORDS), ("sw", SW_WORDS)):
            corpus = root / f"{lang}.txt"
            corpus.write_text("\n".join(make_lines(words, 60)), encoding="utf-8")
            train_language(LangRequest(lang=lang, base=base, corpus=(str(corpus),), sets={**TINY, "max_steps": "2"}))
        write_conll(root / "train.conll", make_ner(60, seed=1))
        write_conll(root / "sw.conll", make_ner(10, seed=5))
        train_task(TaskRequest(task="ner", lang="en", base=base, train_data=str(root / "train.conll"),
                               sets={**TINY, "max_steps": "12", "batch_size": "16", "lr": "3e-3"}))
        composed = compose_task(ComposeRequest(lang="sw", task="ner", base=base, eval_data=str(root / "sw.conll"),
                                               register=True))
        yield {"root": root, "base": base, "kind": request.param, "composed": composed}


@pytest.fixture
def env(store, monkeypatch):
    use_store(monkeypatch, store["root"])
    return store


def tags_of(predictions):
    return [list(p) for p in predictions]


def test_module_folder_is_an_mlflow_model(env):
    path = env["root"] / "modules/task-ner-adapter"
    mlmodel = Model.load(str(path / "MLmodel"))
    assert set(mlmodel.flavors) == {"xlpeft", "python_function"}
    assert mlmodel.flavors["python_function"]["loader_module"] == "xlpeft.tracking.flavor"
    conf = mlmodel.flavors["xlpeft"]
    base = load_base(env["base"])
    assert conf["kind"] == "task" and conf["head"] == "token_classification"
    assert conf["base"] == env["base"] and conf["base_fingerprint"] == base.fingerprint  # referenced, not copied
    assert [c.type.name for c in mlmodel.signature.inputs.inputs] == ["string"]
    assert json.loads((path / "input_example.json").read_text()) == ["Juma alikwenda Nairobi"]
    # the registered artifact is that folder: no base weights in it, and load_module reads only the manifest's files
    run = tracking.list_versions("xlpeft-task-ner-adapter")[0].run_id
    listed = {a.path.removeprefix("module/") for a in tracking.client().list_artifacts(run, "module")}
    assert {"MLmodel", "input_example.json", "xlpeft.json", "adapter.safetensors", "head.safetensors"} <= listed
    assert not any(name.startswith(("model", "pytorch_model", "config")) for name in listed)
    assert set(load_module(path).tensors) == {"adapter", "head"}
    local = mlflow.pyfunc.load_model("modules/task-ner-adapter").predict(SENTENCES)  # the folder itself loads too
    assert tags_of(local) == tags_of(mlflow.pyfunc.load_model("models:/xlpeft-task-ner-adapter/1").predict(SENTENCES))
    lang = Model.load(str(env["root"] / "modules/lang-sw-adapter/MLmodel")).flavors["xlpeft"]
    assert lang["kind"] == "language" and lang["head"] == "mlm"


def test_task_module_pyfunc_predicts_as_predict_lines(env):
    expected = tags_of(p for _, p in predict_lines("en", "ner", env["base"], SENTENCES))
    model = mlflow.pyfunc.load_model("models:/xlpeft-task-ner-adapter/1")
    assert tags_of(model.predict(SENTENCES)) == expected
    assert tags_of(model.predict(pd.DataFrame({"text": SENTENCES}))) == expected
    assert tags_of(model.predict({"inputs": SENTENCES})) == expected
    assert [len(t) for t in expected] == [5, 0, 8]


def test_composition_pyfunc_predicts_as_predict_lines(env):
    expected = tags_of(p for _, p in predict_lines("sw", "ner", env["base"], SENTENCES))
    model = mlflow.pyfunc.load_model("models:/xlpeft-ner-sw@latest")
    assert tags_of(model.predict(SENTENCES)) == expected
    assert env["composed"].registered_name == "xlpeft-ner-sw" and env["composed"].version == "1"
    version = tracking.client().get_model_version("xlpeft-ner-sw", "1")
    lang_reg = tracking.list_versions("xlpeft-lang-sw-adapter")[0]
    task_reg = tracking.list_versions("xlpeft-task-ner-adapter")[0]
    assert version.tags["xlpeft.parent.lang_module"] == "xlpeft-lang-sw-adapter@1"
    assert version.tags["xlpeft.parent.task_module"] == "xlpeft-task-ner-adapter@1"
    assert version.tags["xlpeft.parent.lang_run"] == lang_reg.run_id
    assert version.tags["xlpeft.parent.task_run"] == task_reg.run_id
    listed = {a.path for a in tracking.client().list_artifacts(version.run_id, "model")}
    assert {"model/MLmodel", "model/composition.json", "model/modules"} <= listed
    conf = Model.load(mlflow.artifacts.download_artifacts("models:/xlpeft-ner-sw/1") + "/MLmodel").flavors["xlpeft"]
    assert conf["kind"] == "composition" and conf["parents"]["xlpeft.parent.task_run"] == task_reg.run_id


def test_composition_loads_without_its_parents_in_the_registry(env, tmp_path, monkeypatch):
    local = mlflow.artifacts.download_artifacts("models:/xlpeft-ner-sw/1", dst_path=str(tmp_path / "dl"))
    expected = tags_of(mlflow.pyfunc.load_model(local).predict(SENTENCES))
    use_store(monkeypatch, tmp_path)  # an empty store: neither parent is registered there
    assert tracking.list_registered() == []
    assert tags_of(mlflow.pyfunc.load_model(local).predict(SENTENCES)) == expected


def test_compose_cli_register_prints_the_version_to_serve(env, capsys):
    from xlpeft.cli import main

    main(["compose", "--lang", "sw", "--task", "ner", "--base", env["base"], "--eval-data",
          str(env["root"] / "sw.conll"), "--register"])
    out = capsys.readouterr().out
    assert "registered as xlpeft-ner-sw version 2 (serve: mlflow models serve -m models:/xlpeft-ner-sw/2" in out
    assert [v.version for v in tracking.list_versions("xlpeft-ner-sw")] == ["2", "1"]


def test_load_model_returns_the_composed_module(env):
    from xlpeft.mlflow import load_model

    base = load_base(env["base"])
    ids = torch.randint(5, len(base.tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for uri, stack in (("models:/xlpeft-ner-sw/1", ["lang-sw-adapter", "task-ner-adapter"]),
                       ("models:/xlpeft-task-ner-adapter/1", ["lang-en-adapter", "task-ner-adapter"])):
        model = load_model(uri)
        assert isinstance(model, torch.nn.Module)
        reference = compose(base, [load_module(env["root"] / "modules" / m) for m in stack])
        with torch.no_grad():
            assert torch.allclose(model(**batch).logits, reference(**batch).logits, atol=1e-6)


def test_language_module_fills_the_mask(env):
    base = load_base(env["base"])
    model = mlflow.pyfunc.load_model("models:/xlpeft-lang-sw-adapter/1")
    got = model.predict(["watu wote [MASK] huru", "kila mtu <mask>"])
    assert len(got) == 2 and all(len(f) == flavor.TOP_K and all(isinstance(w, str) for w in f) for f in got)
    mlm = compose(base, [load_module(env["root"] / "modules/lang-sw-adapter")])
    enc = base.tokenizer(f"watu wote {base.tokenizer.mask_token} huru", return_tensors="pt")
    where = int((enc["input_ids"][0] == base.tokenizer.mask_token_id).nonzero()[0])
    with torch.no_grad():
        top = mlm(**enc).logits[0, where].topk(flavor.TOP_K).indices
    assert got[0] == [base.tokenizer.decode([int(i)]).strip() for i in top]
    with pytest.raises(XlpeftError, match="expected \\[MASK\\] or <mask> in each sentence"):
        model.predict(["no mask here"])


def test_a_base_with_another_fingerprint_is_refused(env, base_dirs):
    other = str(base_dirs["tiny-xlmr" if env["kind"] == "tiny-bert" else "tiny-bert"])
    with pytest.raises(XlpeftError, match="has fingerprint .*load it with the same base"):
        mlflow.pyfunc.load_model("models:/xlpeft-task-ner-adapter/1", model_config={"base": other})


def test_a_missing_parent_language_module_is_named(env, tmp_path):
    copy = shutil.copytree(env["root"] / "modules/task-ner-adapter", tmp_path / "task")
    manifest = json.loads((copy / "xlpeft.json").read_text())
    manifest["extra"]["lang_module"] = {"registered_name": "xlpeft-lang-xx-adapter", "version": "3", "lang": "xx",
                                        "path": str(tmp_path / "gone")}
    (copy / "xlpeft.json").write_text(json.dumps(manifest))
    with pytest.raises(XlpeftError, match="language module xlpeft-lang-xx-adapter version 3, which is neither"):
        mlflow.pyfunc.load_model(str(copy))


def test_not_an_xlpeft_model_is_one_clear_error(tmp_path):
    with pytest.raises(XlpeftError, match="no MLmodel in it"):
        flavor.load_flavor(tmp_path)
    with pytest.raises(XlpeftError, match="expected sentences"):
        flavor.sentences_of([1, 2])


def test_nli_task_module_pyfunc_predicts_the_label_of_each_pair(env, tmp_path):
    rows = [{"premise": " ".join(make_lines(EN_WORDS, 1, seed=i, length=8)), "hypothesis": "they are free",
             "label": ["entailment", "neutral", "contradiction"][i % 3]} for i in range(24)]
    train = tmp_path / "nli.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    train_task(TaskRequest(task="nli", lang="en", base=env["base"], train_data=str(train),
                           sets={**TINY, "max_steps": "3", "batch_size": "8"}))
    pairs = ["all human beings are born free\tthey are free", "", "act towards one another\tnobody acts"]
    expected = [p for _, p in predict_lines("en", "nli", env["base"], pairs)]
    got = mlflow.pyfunc.load_model("models:/xlpeft-task-nli-adapter/1").predict(pairs)
    assert got == expected and got[1] == "" and {got[0], got[2]} <= {"entailment", "neutral", "contradiction"}
    conf = Model.load(str(env["root"] / "modules/task-nli-adapter/MLmodel")).flavors["xlpeft"]
    assert conf["head"] == "sequence_classification"
    assert json.loads((env["root"] / "modules/task-nli-adapter/input_example.json").read_text())[0].count("\t") == 1


def test_log_model_makes_a_saved_module_an_mlflow_model(env, tmp_path):
    from xlpeft.mlflow import load_model, log_model

    copy = tmp_path / "sw"
    copy.mkdir()
    source = env["root"] / "modules/lang-sw-adapter"
    for name in ("xlpeft.json", "adapter.safetensors"):  # a module saved without MLmodel (xlpeft 0.1)
        shutil.copy2(source / name, copy / name)
    with mlflow.start_run():
        uri = log_model(copy, "module")
    assert (copy / "MLmodel").is_file()
    sentence = ["watu wote [MASK] huru"]
    assert mlflow.pyfunc.load_model(uri).predict(sentence) == mlflow.pyfunc.load_model(str(source)).predict(sentence)
    assert type(load_model(uri)).__name__.endswith("ForMaskedLM")
