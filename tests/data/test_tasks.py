import json

import pytest

from xlpeft.data.tasks import (
    PairExample,
    TaskSource,
    TokenExample,
    check_labels,
    collate,
    encode_tokens,
    parse_task_data,
    read_conll,
    read_conllu,
    read_jsonl,
    read_source,
)
from xlpeft.errors import XlpeftError


def test_read_conll_tab_and_space_columns(tmp_path):
    p = tmp_path / "a.conll"
    p.write_text("-DOCSTART- O\n\nJuma\tB-PER\nalikwenda\tO\n\nNairobi NNP B-LOC\n", encoding="utf-8")
    assert read_conll(p) == [TokenExample(("Juma", "alikwenda"), ("B-PER", "O")), TokenExample(("Nairobi",), ("B-LOC",))]


def test_read_conllu_skips_comments_ranges_and_empty_nodes(tmp_path):
    p = tmp_path / "a.conllu"
    rows = [
        "# sent_id = 1",
        "1-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_",
        "1\tdo\tdo\tAUX\t_\t_\t0\troot\t_\t_",
        "2\tn't\tnot\tPART\t_\t_\t1\tadvmod\t_\t_",
        "2.1\tx\tx\tX\t_\t_\t_\t_\t_\t_",
        "3\tgo\tgo\tVERB\t_\t_\t1\txcomp\t_\t_",
    ]
    p.write_text("\n".join(rows) + "\n\n", encoding="utf-8")
    assert read_conllu(p) == [TokenExample(("do", "n't", "go"), ("AUX", "PART", "VERB"))]


def test_read_conllu_rejects_wrong_columns(tmp_path):
    p = tmp_path / "bad.conllu"
    p.write_text("1\tdo\tAUX\n", encoding="utf-8")
    with pytest.raises(XlpeftError, match="10 tab-separated columns"):
        read_conllu(p)


def test_read_jsonl_names_and_indices(tmp_path):
    p = tmp_path / "nli.jsonl"
    p.write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": 2}) + "\n"
                 + json.dumps({"premise": "c", "hypothesis": "d", "label": "neutral"}) + "\n", encoding="utf-8")
    labels = ["entailment", "neutral", "contradiction"]
    assert read_jsonl(p, labels) == [PairExample("a", "b", "contradiction"), PairExample("c", "d", "neutral")]
    p.write_text('{"premise": "a"}\n', encoding="utf-8")
    with pytest.raises(XlpeftError, match=r"nli.jsonl:1: expected a JSON object"):
        read_jsonl(p, labels)


def test_unknown_label_is_a_clear_error(tmp_path):
    p = tmp_path / "x.conll"
    p.write_text("Juma\tB-PERSON\n", encoding="utf-8")
    with pytest.raises(XlpeftError, match=r"\['B-PERSON'\].*does not know.*known: O, B-PER"):
        read_source(TaskSource(path=str(p)), "token_classification", ["O", "B-PER", "I-PER"])


def test_label_map_applies_before_checking(tmp_path):
    p = tmp_path / "x.conll"
    p.write_text("Jumatatu\tB-DATE\nJuma\tB-PER\n", encoding="utf-8")
    src = TaskSource(path=str(p), label_map={"B-DATE": "O"})
    assert read_source(src, "token_classification", ["O", "B-PER"])[0].tags == ("O", "B-PER")


def test_first_subword_labelled_only(base):
    ex = [TokenExample(("Kenyatta", "alikutana", "na"), ("B-PER", "O", "O"))]
    enc = encode_tokens(base.tokenizer, ex, {"O": 0, "B-PER": 1}, 64)
    labels = enc.labels[0]
    assert sum(label != -100 for label in labels) == 3
    assert [labels[p] for p in enc.words[0]] == [1, 0, 0]
    assert labels[0] == -100 and labels[-1] == -100  # special tokens
    batch = collate(enc, [0], base.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_check_labels_accepts_known():
    check_labels([TokenExample(("a",), ("O",))], ["O"], "here")


def test_parse_task_data():
    assert parse_task_data("hf:unimelb-nlp/wikiann:sw:test") == TaskSource(hf="unimelb-nlp/wikiann", config="sw", split="test")
    assert parse_task_data("x.conllu").file_format() == "conllu"


def test_data_fingerprint_follows_the_content_of_every_source_read(tmp_path):
    """A pack's own files count like --train-data: a changed file changes the fingerprint (resume / pipeline skip)."""
    from xlpeft.data.tasks import TaskSource, data_fingerprint

    train, dev = tmp_path / "train.conll", tmp_path / "dev.conll"
    train.write_text("Juma\tB-PER\n\n", encoding="utf-8")
    dev.write_text("Nairobi\tB-LOC\n\n", encoding="utf-8")
    hub = TaskSource(hf="unimelb-nlp/wikiann", config="sw", split="validation")
    before = data_fingerprint(TaskSource(path=str(train)), TaskSource(path=str(dev)), hub)
    assert before == data_fingerprint(TaskSource(path=str(train)), TaskSource(path=str(dev)), hub)
    dev.write_text("Mombasa\tB-LOC\n\n", encoding="utf-8")
    assert data_fingerprint(TaskSource(path=str(train)), TaskSource(path=str(dev)), hub) != before
    other_hub = TaskSource(hf="unimelb-nlp/wikiann", config="yo", split="validation")
    assert data_fingerprint(TaskSource(path=str(train)), TaskSource(path=str(dev)), other_hub) != \
        data_fingerprint(TaskSource(path=str(train)), TaskSource(path=str(dev)), hub)
