"""Applying a saved sft module: its delta added into the weights in place, removed bit-exactly.

Also the untied decoder of ``freeze_decoder`` (composable-sft ``--freeze_decoder``), shared by
training (:mod:`.trainable`) and application.
"""

from __future__ import annotations

import torch
from torch import nn

from xlpeft.errors import XlpeftError
from xlpeft.methods.sft.delta import SparseDelta


def untie_decoder(model: nn.Module) -> tuple[nn.Module, nn.Parameter] | None:
    """Give the MLM decoder its own frozen copy of the word embeddings (composable-sft ``--freeze_decoder``).

    The instance's ``weight`` attribute is replaced; no class is patched. Returns (decoder, the
    shared weight) for :func:`retie_decoder`, or None when there is nothing tied (a task model, or
    a decoder that is already separate).
    """
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    shared = out.weight
    out.weight = nn.Parameter(shared.detach().clone(), requires_grad=False)
    return out, shared


def retie_decoder(decoder: nn.Module, shared: nn.Parameter) -> None:
    """Undo :func:`untie_decoder`: the decoder shares the word embeddings' tensor again."""
    decoder.weight = shared


class AppliedSFT:
    """A saved sft module applied (:class:`~xlpeft.methods.base.Applied`): its delta added to the weights in place.

    ``remove()`` restores the weights bit-exactly (:meth:`SparseDelta.revert`) and re-ties the
    decoder if it was untied for a module trained with ``freeze_decoder``.
    """

    def __init__(self, delta: SparseDelta, model: nn.Module, freeze_decoder: bool) -> None:
        self._decoder = untie_decoder(model) if freeze_decoder else None  # before the delta changes the embeddings
        try:
            delta.apply(model)
        except BaseException:
            if self._decoder is not None:
                retie_decoder(*self._decoder)
            raise
        self.delta, self.model, self._applied = delta, model, True

    def remove(self) -> None:
        if self._applied:
            self.delta.revert(self.model)
            self._applied = False
        if self._decoder is not None:
            retie_decoder(*self._decoder)
            self._decoder = None

    def modules(self) -> list[nn.Module]:
        return []  # nothing but the base's own weights

    def saved_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}  # merged into the weights: a checkpoint of the composed model already holds it


def apply_sft(base, loaded) -> AppliedSFT:
    """Add a saved module's delta to ``base``'s weights in place; the handle's ``remove()`` restores the weights bit-exactly.

    A language delta may touch the MLM head (composable-sft releases do); on a task model, which has
    no MLM head, those entries have nothing to change and are skipped. A module trained with
    ``freeze_decoder`` is applied the same way: the MLM decoder keeps the base's word embeddings.
    """
    tensors = loaded.tensors.get("delta")
    if tensors is None:
        raise XlpeftError(f"sft module {loaded.path} has no delta.safetensors; it is incomplete, retrain it")
    delta = SparseDelta.from_tensors(tensors)
    head = base.arch.mlm_head + "."
    if base.model.get_output_embeddings() is None:
        delta = SparseDelta({n: e for n, e in delta.entries.items() if not n.startswith(head)})
    return AppliedSFT(delta, base.model, bool((loaded.manifest.config or {}).get("freeze_decoder", False)))
