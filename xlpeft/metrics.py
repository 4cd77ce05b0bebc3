"""Task metrics: entity-level span F1 (seqeval/conlleval style) and accuracy, with per-label scores."""

from __future__ import annotations

from collections import Counter


def spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Entity chunks (type, start, end-exclusive) from IOB2/IOB1 tags, conlleval rules.

    A chunk starts at ``B-X``, or at ``I-X`` following ``O`` or a different type; it ends
    before any tag that is not ``I-X`` of the same type.
    """
    out: set[tuple[str, int, int]] = set()
    start, kind = None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, typ = tag.partition("-") if tag != "O" else ("O", "", "")
        continues = prefix == "I" and kind == typ and start is not None
        if start is not None and not continues:
            out.add((kind, start, i))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, typ
    return out


def span_f1(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Micro precision/recall/F1 over exact (type, span) matches, plus ``f1_<TYPE>`` per entity type."""
    tp, n_pred, n_gold = Counter(), Counter(), Counter()
    for g, p in zip(gold, pred, strict=True):
        gs, ps = spans(g), spans(p)
        for kind, *_ in gs:
            n_gold[kind] += 1
        for kind, *_ in ps:
            n_pred[kind] += 1
        for kind, *_ in gs & ps:
            tp[kind] += 1
    result = _prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    for kind in sorted(set(n_gold) | set(n_pred)):
        result[f"f1_{kind}"] = _prf(tp[kind], n_pred[kind], n_gold[kind])["f1"]
    return result


def accuracy(gold: list[str], pred: list[str]) -> dict[str, float]:
    """Accuracy plus ``f1_<LABEL>`` for every label seen in gold or predictions."""
    correct = sum(g == p for g, p in zip(gold, pred, strict=True))
    result = {"accuracy": correct / max(len(gold), 1)}
    for label in sorted(set(gold) | set(pred)):
        tp = sum(g == p == label for g, p in zip(gold, pred, strict=True))
        result[f"f1_{label}"] = _prf(tp, sum(p == label for p in pred), sum(g == label for g in gold))["f1"]
    return result


def _prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


METRICS = {"span_f1": "f1", "accuracy": "accuracy"}
"""Metric name in a task pack -> the headline key of its result dict."""
