"""Composition: order and arithmetic, fingerprint refusal, lineage, save/reload, the compose/evaluate/predict CLI."""

import json

import pytest
import torch

from tests.conftest import EN_WORDS, SW_WORDS, make_lines, make_ner, use_store, write_conll
from xlpeft import compose, load_module, tracking
from xlpeft.compose import Composition, ModuleRef, Stack, activate
from xlpeft.composed import save_composed
from xlpeft.errors import XlpeftError
from xlpeft.methods.heads import build_head
from xlpeft.models import load_base
from xlpeft.recipes.compose import ComposeRequest, compose_task
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.recipes.train_task import TaskRequest, train_task
from xlpeft.training import task_logits


@pytest.fixture(scope="module")
def store(tmp_path_factory, base_dirs):
    """One MLflow store with en/sw language adapters and an English NER task adapter on tiny-bert."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        base = str(base_dirs["tiny-bert"])
        for lang, words in (("en", EN_WORDS), ("sw", SW_WORDS)):
            corpus = root / f"{lang}.txt"
            corpus.write_text("\n".join(make_lines(words, 150)), encoding="utf-8")
            train_language(LangRequest(lang=lang, base=base, corpus=(str(corpus),),
                                       sets={"max_steps": "6", "max_seq_len": "32", "lr": "1e-2"}))
        write_conll(root / "train.conll", make_ner(120, seed=1))
        write_conll(root / "sw.conll", make_ner(30, seed=5))
        train_task(TaskRequest(task="ner", base=base, train_data=str(root / "train.conll"),
                               sets={"max_steps": "40", "batch_size": "16", "max_seq_len": "48", "lr": "3e-3"}))
        yield {"root": root, "base": base, "mp": mp}


@pytest.fixture
def env(store, monkeypatch):
    use_store(monkeypatch, store["root"])
    return store


def _batch(base, n=3, t=12):
    ids = torch.randint(5, len(base.tokenizer), (n, t), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_adapter_stack_equals_manual_layer_by_layer(env):
    base = load_base(env["base"])
    lang, task = load_module("modules/lang-sw-adapter"), load_module("modules/task-ner-adapter")
    model = compose(base, [lang, task])
    assert type(model).__name__ == "BertForTokenClassification"
    assert model.xlpeft_composition.describe() == "stack(language:sw/adapter, task:ner/adapter)"
    batch = _batch(base)
    with torch.no_grad():
        got = model(**batch).logits
    # by hand: the same two adapters hooked on the MLM base, bottom first, and the saved head
    active = activate(base, [lang, task])
    head = build_head("token_classification", base.hidden_size, 7)
    head.load_state_dict(task.tensors["head"])
    base.model.eval()
    head.eval()
    with torch.no_grad():
        expected = task_logits(base, head, batch)
    active.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the order matters: task below language is refused
    with pytest.raises(XlpeftError, match="task module must sit on top"):
        compose(base, [task, lang])


def test_language_only_composition_is_an_mlm(env):
    base = load_base(env["base"])
    model = compose(base, ["xlpeft-lang-sw-adapter"])
    assert type(model).__name__ == "BertForMaskedLM"
    batch = _batch(base)
    active = activate(base, [load_module("modules/lang-sw-adapter")])
    with torch.no_grad():
        expected = base.model.eval()(**batch).logits
        got = model(**batch).logits
    active.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        bare = base.model(**batch).logits
    assert not torch.allclose(got, bare, atol=1e-4), "the language adapter should change the MLM output"


def test_fingerprint_mismatch_names_both(env, base_dirs):
    other = load_base(str(base_dirs["tiny-xlmr"]))
    mine = load_base(env["base"]).fingerprint
    with pytest.raises(XlpeftError) as err:
        compose(other, ["modules/lang-sw-adapter"])
    assert mine in str(err.value) and other.fingerprint in str(err.value)


def test_composition_is_data():
    lang, task = ModuleRef("language", "sft", "sw", "x"), ModuleRef("task", "adapter", "ner", "y")
    comp = Composition(Stack(lang, task), "fp")
    assert Composition.from_dict(json.loads(json.dumps(comp.to_dict()))) == comp
    with pytest.raises(XlpeftError, match="at most one task"):
        Composition(Stack(task, task), "fp")


def test_saved_composition_reloads_to_identical_logits(env, tmp_path):
    base = load_base(env["base"])
    model = compose(base, ["xlpeft-lang-sw-adapter", "xlpeft-task-ner-adapter"])
    out = save_composed(model, tmp_path / "composed", base.tokenizer)
    again = compose(str(out), [])
    batch = _batch(base)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
    assert not any(k.startswith("xlpeft_modules") for k in json.loads(
        (out / "model.safetensors.index.json").read_text())["weight_map"]) if (out / "model.safetensors.index.json").exists() else True


def test_compose_cli_logs_lineage_and_baseline(env, capsys):
    from xlpeft.cli import main

    main(["compose", "--lang", "sw", "--task", "ner", "--base", env["base"], "--eval-data", "sw.conll",
          "--output", "out/sw-ner"])
    out = capsys.readouterr().out
    assert "zero-shot ner on sw" in out and "baseline (en language module)" in out
    run_id = out.strip().split()[-1]
    run = tracking.client().get_run(run_id)
    tags = run.data.tags
    assert tags["xlpeft.kind"] == "composition" and tags["xlpeft.method"] == "adapter+adapter"
    lang_reg = tracking.list_versions("xlpeft-lang-sw-adapter")[0]
    task_reg = tracking.list_versions("xlpeft-task-ner-adapter")[0]
    assert tags["xlpeft.parent.lang_run"] == lang_reg.run_id
    assert tags["xlpeft.parent.task_run"] == task_reg.run_id
    assert tags["xlpeft.baseline_lang"] == "en"
    assert {"eval_f1", "baseline_f1"} <= set(run.data.metrics)
    assert any(a.path == "composed/xlpeft_composition.json"
               for a in tracking.client().list_artifacts(run_id, "composed"))
    assert (env["root"] / "out/sw-ner/config.json").is_file()


def test_compose_cli_errors_list_registry(env, capsys):
    from xlpeft.cli import main

    with pytest.raises(SystemExit):
        main(["compose", "--lang", "yo", "--task", "ner", "--base", env["base"]])
    err = capsys.readouterr().err
    assert err.startswith("Error: no registered language module xlpeft-lang-yo-*")
    assert "xlpeft-lang-sw-adapter" in err and "xlpeft-task-ner-adapter" in err


def test_evaluate_matrix_table_and_heatmap(env, capsys, tmp_path):
    from xlpeft.cli import main

    write_conll(tmp_path / "sw.conll", make_ner(20, seed=7))
    main(["evaluate", "--task", "ner", "--langs", "sw,yo,en", "--base", env["base"], "--eval-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["f1", "adapter+adapter", "baseline+adapter"]
    assert out.splitlines()[1].startswith("sw")
    assert "baseline+adapter: the adapter task module over its own source-language module (en)" in out
    assert "yo: skipped (no language module registered for yo" in out
    assert "en: skipped (could not load Hugging Face dataset" in out  # offline: the pack's WikiANN
    run_id = out.strip().split()[out.strip().split().index("run") + 1]
    paths = {a.path for a in tracking.client().list_artifacts(run_id, "evaluation")}
    assert {"evaluation/matrix.png", "evaluation/matrix.json"} <= paths
    local = tracking.client().download_artifacts(run_id, "evaluation/matrix.png", str(tmp_path))
    assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the baseline column is the same number compose reports as its baseline on the same data
    matrix = json.loads(open(tracking.client().download_artifacts(run_id, "evaluation/matrix.json", str(tmp_path))).read())
    composed = compose_task(ComposeRequest(lang="sw", task="ner", base=env["base"], eval_data=str(tmp_path / "sw.conll")))
    assert matrix["rows"]["sw"]["baseline+adapter"] == pytest.approx(composed.baseline["f1"])
    assert matrix["rows"]["sw"]["adapter+adapter"] == pytest.approx(composed.metrics["f1"])


def test_predict_reads_stdin(env, capsys, monkeypatch):
    import io

    from xlpeft.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Amina visited Nairobi.\n\nJuma met Kenyatta in Lagos\n"))
    main(["predict", "--lang", "sw", "--task", "ner", "--base", env["base"]])
    blocks = [b for b in capsys.readouterr().out.strip().split("\n\n") if b]
    assert len(blocks) == 2
    first = [line.split("\t") for line in blocks[0].splitlines()]
    assert [t for t, _ in first] == ["Amina", "visited", "Nairobi", "."]
    assert all(tag in ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC") for _, tag in first)


def test_evaluate_matrix_on_a_pack_split_skips_languages_without_it(env, capsys):
    from xlpeft.cli import main

    main(["evaluate", "--task", "ner", "--langs", "sw,en", "--base", env["base"], "--split", "sample_test"])
    out = capsys.readouterr().out
    sw = out.splitlines()[1].split()
    assert sw[0] == "sw" and all(0.0 <= float(v) <= 1.0 for v in sw[1:])  # the pack's shipped sw sample
    assert "en: skipped (the ner pack has no sample_test split for en)" in out


def test_compose_cli_stacks_extra_modules_between_language_and_task(env, capsys):
    """--module puts a third module (here the en language adapter, as a 'domain' module) between the two."""
    from xlpeft.cli import main
    from xlpeft.composed import COMPOSITION_FILE

    main(["compose", "--lang", "sw", "--task", "ner", "--base", env["base"], "--eval-data", "sw.conll",
          "--module", "xlpeft-lang-en-adapter@1", "--output", "out/three"])
    out = capsys.readouterr().out
    assert "sw language module + xlpeft-lang-en-adapter@1 + task module: f1" in out
    run = tracking.client().get_run(out.strip().split()[-1])
    assert run.data.tags["xlpeft.composition"] == "stack(language:sw/adapter, language:en/adapter, task:ner/adapter)"
    assert run.data.tags["xlpeft.method"] == "adapter+adapter+adapter"
    assert run.data.tags["xlpeft.parent.modules"] == "xlpeft-lang-en-adapter@1"
    assert run.data.params["modules"] == "xlpeft-lang-en-adapter@1"
    record = json.loads((env["root"] / "out/three" / COMPOSITION_FILE).read_text())
    sources = [leaf["module"]["source"] for leaf in record["root"]["stack"]]
    assert sources == ["xlpeft-lang-sw-adapter@1", "xlpeft-lang-en-adapter@1", "xlpeft-task-ner-adapter@1"]
    # the saved model is the three modules applied in that order, not the two-module composition
    base = load_base(env["base"])
    three = compose(base, sources)
    batch = _batch(base)
    with torch.no_grad():
        reloaded = compose(str(env["root"] / "out/three"), [])(**batch).logits
        torch.testing.assert_close(reloaded, three(**batch).logits, rtol=0, atol=1e-6)
        assert not torch.allclose(reloaded, compose(base, [sources[0], sources[2]])(**batch).logits)
    # the baseline stays the task module over its recorded source-language module
    two = compose_task(ComposeRequest(lang="sw", task="ner", base=env["base"], eval_data="sw.conll"))
    extra = compose_task(ComposeRequest(lang="sw", task="ner", base=env["base"], eval_data="sw.conll",
                                        modules=("xlpeft-lang-en-adapter@1",)))
    assert extra.baseline == two.baseline and extra.baseline_lang == "en"


def test_compose_refuses_extra_modules_it_cannot_stack(env):
    with pytest.raises(XlpeftError, match="at most one task module"):
        compose_task(ComposeRequest(lang="sw", task="ner", base=env["base"], modules=("xlpeft-task-ner-adapter",)))
    with pytest.raises(XlpeftError, match="neither a directory nor a registered name"):
        compose_task(ComposeRequest(lang="sw", task="ner", base=env["base"], modules=("no-such-module",)))


def test_compose_refuses_a_task_module_without_labels_or_for_another_pack(env):
    import dataclasses

    from xlpeft.packs import load_task_pack
    from xlpeft.recipes.compose import check_task_module

    base = load_base(env["base"])
    task = load_module(tracking.find_module("task", "ner", fingerprint=base.fingerprint)[0])
    ner, pos = load_task_pack("ner"), load_task_pack("pos")
    check_task_module(ModuleRef.of(task), ner, base.hidden_size)  # a good module passes
    extra = {k: v for k, v in task.manifest.extra.items() if k != "labels"}
    no_labels = dataclasses.replace(task, manifest=dataclasses.replace(task.manifest, extra=extra))
    with pytest.raises(XlpeftError, match="has no head .* labels"):
        check_task_module(ModuleRef.of(no_labels), ner, base.hidden_size)
    with pytest.raises(XlpeftError, match=f"predicts {len(ner.labels)} labels .* the pos pack has {len(pos.labels)}"):
        check_task_module(ModuleRef.of(task), pos, base.hidden_size)
