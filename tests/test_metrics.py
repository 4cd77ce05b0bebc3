import pytest

from xlpeft.metrics import accuracy, span_f1, spans


def test_spans_follow_conlleval_rules():
    assert spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert spans(["I-ORG", "I-ORG", "O"]) == {("ORG", 0, 2)}  # I- after O starts a chunk
    assert spans(["B-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 2)}  # type change splits
    assert spans(["B-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 1, 2)}
    assert spans(["O", "O"]) == set()


def test_span_f1_exact_match_only():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "O", "O", "B-LOC"]]  # PER span too short: wrong; LOC right
    result = span_f1(gold, pred)
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx(0.5)
    assert result["f1_LOC"] == 1.0 and result["f1_PER"] == 0.0


def test_span_f1_perfect_and_empty():
    assert span_f1([["B-ORG", "I-ORG"]], [["B-ORG", "I-ORG"]])["f1"] == 1.0
    assert span_f1([["O"]], [["O"]])["f1"] == 0.0


def test_accuracy_with_per_label_f1():
    result = accuracy(["NOUN", "VERB", "NOUN"], ["NOUN", "NOUN", "NOUN"])
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["f1_VERB"] == 0.0
    assert result["f1_NOUN"] == pytest.approx(0.8)
