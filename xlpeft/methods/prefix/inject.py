"""Injection of prefix and prompt sources by hooks only (see :mod:`xlpeft.methods.prefix` for the method).

Prefixes (Li & Liang 2021): a forward pre-hook on each self-attention module hands it a
:class:`PrefixCache` as ``cache``; BERT/XLM-R self-attention calls ``cache.update(key, value,
layer_idx)``, which prepends the prefixes, and the hook widens the attention mask. Prompts (Lester
et al. 2021): a pre-hook on the encoder model prepends them to the word embeddings, a forward hook on
its layer stack strips them again. One *site* per hooked module holds the sources applied there in
attach order, so modules concatenate bottom first and can be removed in any order.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from xlpeft.errors import XlpeftError
from xlpeft.methods.gates import Gate, current_gate, is_open
from xlpeft.models import ArchSpec, get_submodule, usable_positions

# ---- attention masks and the cache object

def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Prepend ``n`` always-visible key columns to an attention mask of any form the attention functions take.

    None stays None (everything visible). A bool mask (sdpa: True = attend) gets True columns; an
    additive float mask (eager/sdpa: 0 = attend, large negative = masked) gets 0.0; a 2-D 0/1 mask gets 1s.
    Works for (B, T), (B, 1, Tq, Tk) and (B, 1, 1, Tk) shapes alike: the new columns go on the last dim.
    """
    if mask is None or n == 0:
        return mask
    if mask.dtype == torch.bool:
        visible = True
    elif mask.dim() == 2:
        visible = 1
    else:
        visible = 0.0
    pad = torch.full((*mask.shape[:-1], n), visible, dtype=mask.dtype, device=mask.device)  # (..., n)
    return torch.cat([pad, mask], dim=-1)  # (..., n + Tk)


class PrefixCache:
    """Stands in for transformers' ``Cache`` in one self-attention call: ``update`` prepends the prefixes.

    Holds key and value prefixes (B, heads, P, d) and returns ``[prefix; tokens]`` along the key axis.
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value = key, value

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int | None = None,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.key, key], dim=2), torch.cat([self.value, value], dim=2)  # (B, nh, P + T, d)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # the tokens' positions do not move: prefixes are not tokens


# ---- sites: one per hooked module, holding the sources applied there, bottom first

class _Site:
    """The hooks on one module and the sources applied there in attach order.

    Sources applied under a gate (:mod:`xlpeft.methods.gates`) count only while it is open (:attr:`live`).
    """

    def __init__(self, handles: list) -> None:
        self.handles, self.sources = handles, []
        self.gates: dict[int, Gate] = {}  # id(source) -> the gate it was attached under

    @property
    def live(self) -> list:
        return [s for s in self.sources if is_open(self.gates.get(id(s)))]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


_SITES: weakref.WeakKeyDictionary[nn.Module, _Site] = weakref.WeakKeyDictionary()


def _split_heads(x: torch.Tensor, heads: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    p, h = x.shape
    x = x.to(dtype=like.dtype, device=like.device).view(p, heads, h // heads).transpose(0, 1)  # (nh, P, d)
    return x.unsqueeze(0).expand(batch, -1, -1, -1)  # (B, nh, P, d)


def _attention_hook(site: _Site, layer_idx: int) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        sources = site.live
        if not sources:
            return None
        if kwargs.get("cache") is not None:
            raise XlpeftError("prefix tuning cannot run with a key/value cache passed to the model (decoding); "
                              "call the encoder without cache/past_key_values")
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
        pairs = [s.layer(layer_idx) for s in sources]
        key = torch.cat([k for k, _ in pairs])  # (P_total, H), bottom module first
        value = torch.cat([v for _, v in pairs])  # (P_total, H)
        heads, batch = module.num_attention_heads, hidden.shape[0]
        kwargs = dict(kwargs)
        kwargs["cache"] = PrefixCache(_split_heads(key, heads, batch, hidden), _split_heads(value, heads, batch, hidden))
        if len(args) > 1:  # attention_mask passed positionally
            args = (args[0], extend_mask(args[1], key.shape[0]), *args[2:])
        else:
            kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), key.shape[0])
        return args, kwargs
    return hook


class _PromptSite(_Site):
    """Pre-hook on the encoder model (prepends the prompts), forward hook on its layer stack (strips them)."""

    def __init__(self, encoder: nn.Module, stack: nn.Module, limit: int) -> None:
        super().__init__([])
        self.limit, self.inserted = limit, 0
        self.handles += [encoder.register_forward_pre_hook(self.prepend, with_kwargs=True),
                         stack.register_forward_hook(self.strip)]

    def prepend(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.inserted = 0
        sources = self.live
        if not sources:
            return None
        kwargs = dict(kwargs)
        input_ids = args[0] if args else kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(input_ids)  # (B, T, H)
        if kwargs.get("position_ids") is not None:
            raise XlpeftError("prompt tuning (layers=input) numbers positions itself; call the model without "
                              "position_ids")
        prompts = torch.cat([s.prompts() for s in sources]).to(embeds.dtype)  # (P, H), bottom module first
        batch, p = embeds.shape[0], prompts.shape[0]
        if p + embeds.shape[1] > self.limit:
            raise XlpeftError(f"prompt tuning puts {p} prompt vectors before {embeds.shape[1]} tokens, longer than "
                              f"the base's {self.limit} positions; lower max_seq_len to {self.limit - p} or less")
        kwargs["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)  # (B, P+T, H)
        kwargs["input_ids"] = None
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = extend_mask(mask, p)  # (B, P + T)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, p), types], dim=1)  # (B, P + T)
        self.inserted = p
        return (), kwargs

    def strip(self, module: nn.Module, args: tuple, output: Any) -> Any:
        p, self.inserted = self.inserted, 0
        if p:
            output["last_hidden_state"] = output["last_hidden_state"][:, p:]  # (B, T, H): virtual positions dropped
        return output


class _ShiftSite(_Site):
    """Pre-hook on the embeddings: real tokens numbered from the prefixes' total length (peft's cache route)."""

    def __init__(self, embeddings: nn.Module, limit: int) -> None:
        super().__init__([])
        self.limit = limit
        self.handles.append(embeddings.register_forward_pre_hook(self.shift, with_kwargs=True))

    def shift(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        p = sum(s.config.prefix_length for s in self.live)
        if not p:
            return None
        ids = args[0] if args else kwargs.get("input_ids")
        length = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
        if kwargs.get("position_ids") is None and p + length > self.limit:
            raise XlpeftError(f"shift_positions numbers {length} tokens from {p}, past the base's {self.limit} "
                              f"positions; lower max_seq_len to {self.limit - p} or less")
        kwargs = dict(kwargs)
        kwargs["cache_length"] = kwargs.get("cache_length", 0) + p  # as BertModel does for a cache holding P keys
        return args, kwargs


class Attachment:
    """One source attached to a model; ``remove()`` takes it off (idempotent), the hooks go with the last one."""

    def __init__(self, sites: list[tuple[nn.Module, _Site]], source: nn.Module) -> None:
        self._sites, self.source = sites, source

    def remove(self) -> None:
        for owner, site in self._sites:
            if any(s is self.source for s in site.sources):
                site.sources = [s for s in site.sources if s is not self.source]
                site.gates.pop(id(self.source), None)
            if not site.sources:
                site.close()
                if _SITES.get(owner) is site:
                    del _SITES[owner]
        self._sites = []


def attach_prefix(model: nn.Module, arch: ArchSpec, source: nn.Module) -> Attachment:
    """Attach a prefix (``layers=all``) or prompt (``layers=input``) source to ``model``; returns its :class:`Attachment`.

    Sources already attached stay below: their prefixes come first.
    """
    sites: list[tuple[nn.Module, _Site]] = []
    if source.config.layers == "input":
        encoder = get_submodule(model, arch.encoder)
        site = _SITES.get(encoder)
        if site is None:
            stack = get_submodule(model, arch.layers.rsplit(".", 1)[0])  # the layer stack (BertEncoder)
            site = _SITES[encoder] = _PromptSite(encoder, stack, usable_positions(model))
        sites.append((encoder, site))
    else:
        for i, layer in enumerate(get_submodule(model, arch.layers)):
            attention = get_submodule(layer, arch.self_attention)
            site = _SITES.get(attention)
            if site is None:
                site = _SITES[attention] = _Site([])
                site.handles.append(attention.register_forward_pre_hook(_attention_hook(site, i), with_kwargs=True))
            sites.append((attention, site))
        if source.config.shift_positions:
            embeddings = get_submodule(model, arch.embeddings)
            site = _SITES.get(embeddings)
            if site is None:
                site = _SITES[embeddings] = _ShiftSite(embeddings, usable_positions(model))
            sites.append((embeddings, site))
    gate = current_gate()
    for _, site in sites:
        site.sources.append(source)
        if gate is not None:
            site.gates[id(source)] = gate
    return Attachment(sites, source)
