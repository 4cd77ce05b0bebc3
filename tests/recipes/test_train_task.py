"""train-task on tiny bases: language module found by registry, loss falls, reload predicts the same."""

import json

import pytest
import torch

from tests.conftest import make_ner
from xlpeft import load_module, tracking
from xlpeft.compose import activate
from xlpeft.data.tasks import TokenExample
from xlpeft.errors import XlpeftError
from xlpeft.evaluation import predict
from xlpeft.methods.heads import build_head
from xlpeft.models import load_base
from xlpeft.packs import load_task_pack
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.recipes.train_task import TaskRequest, train_task
from xlpeft.training import task_logits

SETS = {"max_seq_len": "48", "lr": "3e-3", "log_every": "5"}


@pytest.fixture
def lang_en(workdir, base_dirs, tmp_path):
    from tests.conftest import EN_WORDS, make_lines

    corpus = tmp_path / "en.txt"
    corpus.write_text("\n".join(make_lines(EN_WORDS, 120)), encoding="utf-8")
    return train_language(LangRequest(lang="en", base=str(base_dirs["tiny-bert"]), corpus=(str(corpus),),
                                      sets={"max_steps": "4", "max_seq_len": "32"}))


def test_task_adapter_over_registered_language_module(workdir, base_dirs, lang_en, ner_files):
    base_dir = str(base_dirs["tiny-bert"])
    result = train_task(TaskRequest(task="ner", lang="en", base=base_dir, train_data=str(ner_files["train"]),
                                    eval_data=str(ner_files["eval"]),
                                    sets={**SETS, "max_steps": "60", "batch_size": "16"}))
    # lineage: the language module found by name, recorded in manifest and tags
    manifest = json.loads((result.path / "xlpeft.json").read_text())
    assert manifest["kind"] == "task" and manifest["task"] == "ner" and manifest["lang"] == "en"
    assert manifest["extra"]["lang_module"]["registered_name"] == "xlpeft-lang-en-adapter"
    assert manifest["extra"]["lang_module"]["run_id"] == lang_en.run_id
    assert manifest["extra"]["labels"] == list(load_task_pack("ner").labels)
    assert manifest["config"]["reduction_factor"] == 16.0 and manifest["config"]["invertible"] is False
    run = tracking.client().get_run(result.run_id)
    assert run.data.tags["xlpeft.kind"] == "task" and run.data.tags["xlpeft.task"] == "ner"
    assert run.data.tags["xlpeft.parent.lang_run"] == lang_en.run_id
    assert "eval_f1" in run.data.metrics and "eval_f1_PER" in run.data.metrics
    assert result.registered_name == "xlpeft-task-ner-adapter"
    # training lowers the loss
    history = [m.value for m in tracking.client().get_metric_history(result.run_id, "loss")]
    assert history[-1] < 0.7 * history[0]
    assert result.metrics["f1"] > 0.3


def test_reloaded_task_module_predicts_the_same(workdir, base_dirs, lang_en, ner_files):
    base_dir = str(base_dirs["tiny-bert"])
    result = train_task(TaskRequest(task="ner", lang="en", base=base_dir, train_data=str(ner_files["train"]),
                                    eval_data=str(ner_files["eval"]),
                                    sets={**SETS, "max_steps": "30", "batch_size": "16"}))
    pack = load_task_pack("ner")
    base = load_base(base_dir)
    task = load_module(result.path)
    lang = load_module(lang_en.path)
    active = activate(base, [lang, task])
    head = build_head("token_classification", base.hidden_size, len(pack.labels))
    head.load_state_dict(task.tensors["head"])
    examples = [TokenExample(tuple(t for t, _ in s), tuple(g for _, g in s)) for s in make_ner(20, seed=9)]
    base.model.eval()
    head.eval()
    first = predict(lambda b: task_logits(base, head, b), pack, base.tokenizer, examples)
    active.remove()
    # a second, independent load gives the same predictions
    base2 = load_base(base_dir)
    active2 = activate(base2, [load_module(lang_en.path), load_module(result.path)])
    head2 = build_head("token_classification", base2.hidden_size, len(pack.labels))
    head2.load_state_dict(load_module(result.path).tensors["head"])
    base2.model.eval()
    head2.eval()
    assert predict(lambda b: task_logits(base2, head2, b), pack, base2.tokenizer, examples) == first
    active2.remove()


def test_lang_module_none_and_missing(workdir, base_dirs, ner_files):
    base_dir = str(base_dirs["tiny-xlmr"])
    with pytest.raises(XlpeftError, match="no registered language module for 'en'.*lang_module=none"):
        train_task(TaskRequest(task="ner", base=base_dir, train_data=str(ner_files["train"]),
                               sets={"max_steps": "2"}))
    result = train_task(TaskRequest(task="ner", base=base_dir, train_data=str(ner_files["train"]),
                                    sets={"max_steps": "3", **SETS, "lang_module": "none"}))
    assert result.lang_module is None
    assert json.loads((result.path / "xlpeft.json").read_text())["extra"]["lang_module"] is None


def test_nli_and_pos_heads(workdir, base_dirs, tmp_path):
    base_dir = str(base_dirs["tiny-bert"])
    rows = [{"premise": "Juma works in Nairobi", "hypothesis": h, "label": lab}
            for h, lab in [("Juma works", "entailment"), ("Juma sleeps", "neutral"), ("nobody works", "contradiction")]]
    nli = tmp_path / "nli.jsonl"
    nli.write_text("\n".join(json.dumps(r) for r in rows * 10), encoding="utf-8")
    res = train_task(TaskRequest(task="nli", base=base_dir, train_data=str(nli),
                                 sets={"max_steps": "3", **SETS, "lang_module": "none"}))
    assert "accuracy" in res.metrics
    assert load_module(res.path).tensors["head"]["classifier.weight"].shape == (3, 32)
    conllu = tmp_path / "pos.conllu"
    sent = "1\tJuma\t_\tPROPN\t_\t_\t0\troot\t_\t_\n2\tanakula\t_\tVERB\t_\t_\t1\tx\t_\t_\n"
    conllu.write_text((sent + "\n") * 20, encoding="utf-8")
    res = train_task(TaskRequest(task="pos", base=base_dir, train_data=str(conllu),
                                 sets={"max_steps": "3", **SETS, "lang_module": "none"}))
    assert "accuracy" in res.metrics and "f1_NOUN" in res.metrics and "f1_PROPN" not in res.metrics  # UPOS -> universal


def test_unknown_label_through_cli(capsys, workdir, base_dirs, tmp_path):
    from xlpeft.cli import main

    bad = tmp_path / "bad.conll"
    bad.write_text("Juma\tB-PER\nNairobi\tB-GPE\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["train-task", "--task", "ner", "--base", str(base_dirs["tiny-bert"]), "--train-data", str(bad)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("Error:") and "B-GPE" in err and "Traceback" not in err
    assert tracking.list_registered() == []


def test_fingerprint_mismatch_refused(workdir, base_dirs, lang_en, ner_files):
    with pytest.raises(XlpeftError, match="fingerprint"):
        train_task(TaskRequest(task="ner", base=str(base_dirs["tiny-xlmr"]), train_data=str(ner_files["train"]),
                               sets={"max_steps": "2", "lang_module": str(lang_en.path)}))
    assert torch.is_tensor(load_module(lang_en.path).tensors["adapter"]["layers.0.ffn.up.weight"])


def test_a_second_run_reads_the_encoded_training_data_from_the_cache(workdir, base_dirs, ner_files, capsys):
    def run(out: str):
        result = train_task(TaskRequest(task="ner", base=str(base_dirs["tiny-bert"]), train_data=str(ner_files["train"]),
                                        output=out, sets={"max_steps": "3", **SETS, "lang_module": "none"}))
        return load_module(result.path).tensors, capsys.readouterr().err

    (a, err_a), (b, err_b) = run("modules/a"), run("modules/b")
    assert "encoded training data: from the cache" not in err_a and "encoded training data: from the cache" in err_b
    assert a.keys() == b.keys() and all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s])
