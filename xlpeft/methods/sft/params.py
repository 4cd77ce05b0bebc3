"""Which weights a sparse delta may touch, named canonically (the tied decoder once, under the encoder)."""

from __future__ import annotations

from torch import nn

from xlpeft.methods.sft.config import SFTConfig


def maskable_parameters(base, config: SFTConfig) -> dict[str, nn.Parameter]:
    """The weights a delta may touch, by canonical name, in the model's order.

    A weight's canonical name is its first name outside the MLM head: the decoder weight tied to
    the word embeddings is listed once, as ``<encoder>.embeddings.word_embeddings.weight``, even
    where ``named_parameters()`` would name it ``lm_head.decoder.weight`` (XLM-R), so a delta
    also applies to a classification model built on the same encoder. Excluded: the MLM head's own
    weights (transform, its LayerNorm, output bias); LayerNorms if ``freeze_layer_norm``; the
    embeddings module if not ``include_embeddings``.
    """
    model = base.model
    frozen: set[int] = set()
    if config.freeze_layer_norm:
        frozen |= {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    if not config.include_embeddings:
        frozen |= {id(p) for p in base.encoder.embeddings.parameters()}
    head = base.arch.mlm_head + "."
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith(head) or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) not in frozen and p.is_floating_point():
            out[name] = p
    return out
