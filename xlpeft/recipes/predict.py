"""``xlpeft predict``: tag raw lines (token tasks) or classify ``premise<TAB>hypothesis`` lines with composed modules."""

from __future__ import annotations

from typing import Any

from xlpeft.compose import Composition, compose
from xlpeft.data.text import examples_from_lines
from xlpeft.evaluation import predict_model
from xlpeft.lineage import registered_ref
from xlpeft.models import load_base
from xlpeft.packs import TaskPack, load_task_pack


def predict_lines(lang: str, task: str, base_name: str, lines: list[str], lang_method: str | None = None,
                  task_method: str | None = None) -> list[tuple[Any, Any]]:
    """(example, prediction) per input line: word tags (token tasks) or a label (NLI); blank lines predict nothing.

    Raises:
        XlpeftError: a module is not registered, or a pair-task line has no tab.
    """
    pack = load_task_pack(task)
    base = load_base(base_name)
    lang_ref, _ = registered_ref("language", lang, lang_method, base.fingerprint)
    task_ref, _ = registered_ref("task", task, task_method, base.fingerprint)
    model = compose(base, Composition.of([lang_ref, task_ref], base.fingerprint))
    return predict_with(model, pack, model.xlpeft_tokenizer, lines)


def predict_with(model, pack: TaskPack, tokenizer, lines: list[str]) -> list[tuple[Any, Any]]:
    """:func:`predict_lines` on a composed model: the one prediction core of ``xlpeft predict`` and the MLflow pyfunc."""
    examples, keep = examples_from_lines(pack, lines)
    preds = predict_model(model, pack, tokenizer, [examples[i] for i in keep])
    out: list[Any] = [[] if pack.head == "token_classification" else "" for _ in lines]  # a blank line: an empty block
    for i, pred in zip(keep, preds, strict=True):
        out[i] = pred
    return list(zip(examples, out, strict=True))
