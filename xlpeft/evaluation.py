"""Task evaluation shared by training and composition: which examples, encode, predict, score.

Prediction takes a ``logits_fn`` (batch -> logits), so the same code scores a base + head
during training (:func:`evaluate_task`) and a composed Hugging Face model afterwards
(:func:`evaluate_model`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from xlpeft.data.tasks import NO_SUBWORD, Encoded, collate, encode_pairs, encode_tokens, parse_task_data, read_source
from xlpeft.interrupts import poll
from xlpeft.metrics import accuracy, span_f1
from xlpeft.models import fit_seq_len
from xlpeft.packs import TaskPack
from xlpeft.progress import progress
from xlpeft.training import task_logits

EVAL_MAX_LEN = 128
"""Sub-words per example when scoring a composed model (MAD-X evaluates NER/POS at 128)."""


def encode(pack: TaskPack, tokenizer, examples: list, max_len: int, purpose: str = "evaluation"):
    """Encode examples for the pack's head, warning (once per call) about examples cut by ``max_len``."""
    label2id = {label: i for i, label in enumerate(pack.labels)}
    if pack.head == "token_classification":
        enc = encode_tokens(tokenizer, examples, label2id, max_len)
    else:
        enc = encode_pairs(tokenizer, examples, label2id, max_len)
    if enc.truncated:
        warn_truncated(enc, len(examples), max_len, purpose, default_label(pack))
    return enc


def default_label(pack: TaskPack) -> str:
    """The label a word without a prediction is scored as: ``O`` if the pack has it, else its first label."""
    return "O" if "O" in pack.labels else pack.labels[0]


def warn_truncated(enc: Encoded, n: int, max_len: int, purpose: str, default: str) -> None:
    cut = (f"; {enc.words_cut} word(s) past the limit "
           + (f"are scored as {default!r}" if purpose == "evaluation" else "are not trained on")) if enc.words_cut else ""
    warnings.warn(
        f"{purpose}: {enc.truncated} of {n} example(s) are longer than max_seq_len={max_len} sub-words and were "
        f"truncated{cut}; raise --set max_seq_len (up to the base's usable positions) to keep them whole",
        stacklevel=3,
    )


@dataclass
class EvalSet:
    """Examples encoded, sorted by length and padded into batches once, to be scored under any number of models.

    Encoding and padding depend on the tokenizer, ``max_len`` and ``batch_size`` only, never on the
    modules applied, so a transfer matrix prepares each language once and runs only the forward per cell.
    """

    pack: TaskPack
    examples: list
    enc: Encoded
    batches: list[tuple[list[int], dict[str, torch.Tensor]]]  # (example indices, input_ids/attention_mask (B, T))
    max_len: int


def eval_set(pack: TaskPack, tokenizer, examples: list, batch_size: int = 32, max_len: int = EVAL_MAX_LEN) -> EvalSet:
    """Encode ``examples`` (warning once about cut ones) and pad them into batches of similar length."""
    enc = encode(pack, tokenizer, examples, max_len)
    # batches of similar length pad less (a treebank's 5- and 60-word sentences in one batch pad to 60):
    # predictions are per example, so the order only changes the cost, not the result
    order = sorted(range(len(examples)), key=lambda i: len(enc.input_ids[i]))
    batches = []
    for start in range(0, len(examples), batch_size):
        idx = order[start:start + batch_size]
        batches.append((idx, {k: v for k, v in collate(enc, idx, tokenizer.pad_token_id).items() if k != "labels"}))
    return EvalSet(pack, examples, enc, batches, max_len)


@torch.no_grad()
def predict_set(logits_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], data: EvalSet,
                device: torch.device | str = "cpu") -> list[Any]:
    """Predicted labels of a prepared :class:`EvalSet`: one per example, or for token tasks one per word.

    A word with no sub-word in the input (it tokenised to nothing, or ``max_len`` cut it) gets
    :func:`default_label` at its own position, so it never shifts the predictions of later words.
    """
    pack, enc = data.pack, data.enc
    fallback = default_label(pack)
    token_task = pack.head == "token_classification"
    out: list[Any] = [None] * len(data.examples)
    bar = progress(total=len(data.examples), desc="predicting", unit=" examples", leave=False)  # silent if short
    for idx, inputs in data.batches:
        poll()  # a SIGTERM a finaliser swallowed still ends a long evaluation
        bar.update(len(idx))
        best = logits_fn({k: v.to(device) for k, v in inputs.items()}).argmax(-1).cpu().tolist()  # (B, T) or (B,)
        for row, i in zip(best, idx, strict=True):
            if token_task:
                out[i] = [fallback if pos == NO_SUBWORD else pack.labels[row[pos]] for pos in enc.words[i]]
            else:
                out[i] = pack.labels[row]
    bar.close()
    return out


def predict(logits_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], pack: TaskPack, tokenizer,
            examples: list, device: torch.device | str = "cpu", batch_size: int = 32, max_len: int = EVAL_MAX_LEN) -> list[Any]:
    """Predicted labels: one per example, or for token tasks one per word, read at its first sub-word.

    :func:`eval_set` then :func:`predict_set`; to score one set under many models, call those two.
    """
    return predict_set(logits_fn, eval_set(pack, tokenizer, examples, batch_size, max_len), device)


def score(pack: TaskPack, examples: list, predictions: list) -> dict[str, float]:
    """The pack's metric: span F1 (+ per type) or accuracy (+ per-label F1)."""
    if pack.metric == "span_f1":
        return span_f1([list(e.tags) for e in examples], predictions)
    if pack.head == "token_classification":
        return accuracy([t for e in examples for t in e.tags], [t for p in predictions for t in p])
    return accuracy([e.label for e in examples], predictions)


def evaluate_task(base, head, pack: TaskPack, tokenizer, examples: list, max_len: int) -> dict[str, float]:
    """Score base + head on examples (during training), in eval mode, restoring the previous train/eval state."""
    was = (base.model.training, head.training)
    base.model.eval()
    head.eval()
    device = next(head.parameters()).device
    preds = predict(lambda b: task_logits(base, head, b), pack, tokenizer, examples, device, max_len=max_len)
    base.model.train(was[0])
    head.train(was[1])
    return score(pack, examples, preds)


def model_max_len(model) -> int:
    """:data:`EVAL_MAX_LEN`, or fewer when the model cannot embed that many positions (longer inputs are cut)."""
    return fit_seq_len(EVAL_MAX_LEN, model, explicit=False)


def predict_model(model, pack: TaskPack, tokenizer, examples: list) -> list[Any]:
    """Predictions of a composed model (:func:`xlpeft.compose.compose`), at up to :data:`EVAL_MAX_LEN` sub-words."""
    device = next(model.parameters()).device
    return predict(lambda b: model(**b).logits, pack, tokenizer, examples, device, max_len=model_max_len(model))


def evaluate_set(model, data: EvalSet) -> dict[str, float]:
    """Score a composed model on a prepared :class:`EvalSet` (the same numbers as :func:`evaluate_model`)."""
    device = next(model.parameters()).device
    return score(data.pack, data.examples, predict_set(lambda b: model(**b).logits, data, device))


def evaluate_model(model, pack: TaskPack, tokenizer, examples: list) -> dict[str, float]:
    """Score a composed model on examples (:func:`predict_model`, then the pack's metric)."""
    return score(pack, examples, predict_model(model, pack, tokenizer, examples))


def eval_examples(pack: TaskPack, lang: str, spec: str | None,
                  split: str | None = None) -> tuple[list | None, str | None]:
    """--eval-data, else the pack's ``split`` (default test, else validation) for ``lang``, else nothing.

    Returns:
        (examples, description of where they came from), or (None, None) when the pack has no data for ``lang``.
    """
    if spec:
        source = parse_task_data(spec)
    elif split:
        source = pack.source(lang, split)
    else:
        splits = pack.sources.get(lang, {})
        split = next((s for s in ("test", "validation") if s in splits), None)
        if split is None:
            return None, None
        source = splits[split]
    return read_source(source, pack.head, list(pack.labels), pack.input_map), source.describe()
