"""Task evaluation shared by training and composition: encode, predict, score.

Prediction takes a ``logits_fn`` (batch -> logits), so the same code scores a base + head
during training and a composed Hugging Face model afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from xlpeft.data.tasks import collate, encode_pairs, encode_tokens
from xlpeft.metrics import accuracy, span_f1
from xlpeft.packs import TaskPack


def encode(pack: TaskPack, tokenizer, examples: list, max_len: int):
    label2id = {label: i for i, label in enumerate(pack.labels)}
    if pack.head == "token_classification":
        return encode_tokens(tokenizer, examples, label2id, max_len)
    return encode_pairs(tokenizer, examples, label2id, max_len)


@torch.no_grad()
def predict(logits_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], pack: TaskPack, tokenizer,
            examples: list, device: torch.device | str = "cpu", batch_size: int = 32, max_len: int = 128) -> list[Any]:
    """Predicted labels: one per word for token tasks (words cut by ``max_len`` get "O"), one per example otherwise."""
    enc = encode(pack, tokenizer, examples, max_len)
    fallback = "O" if "O" in pack.labels else pack.labels[0]
    out: list[Any] = []
    for start in range(0, len(examples), batch_size):
        idx = list(range(start, min(start + batch_size, len(examples))))
        batch = {k: v.to(device) for k, v in collate(enc, idx, tokenizer.pad_token_id).items() if k != "labels"}
        best = logits_fn(batch).argmax(-1).cpu()  # (B, T) or (B,)
        for row, i in enumerate(idx):
            if pack.head == "token_classification":
                words = [pack.labels[int(best[row, pos])] for pos in enc.words[i]]
                words += [fallback] * (len(examples[i].tokens) - len(words))
                out.append(words)
            else:
                out.append(pack.labels[int(best[row])])
    return out


def score(pack: TaskPack, examples: list, predictions: list) -> dict[str, float]:
    """The pack's metric: span F1 (+ per type) or accuracy (+ per-label F1)."""
    if pack.metric == "span_f1":
        return span_f1([list(e.tags) for e in examples], predictions)
    if pack.head == "token_classification":
        return accuracy([t for e in examples for t in e.tags], [t for p in predictions for t in p])
    return accuracy([e.label for e in examples], predictions)
