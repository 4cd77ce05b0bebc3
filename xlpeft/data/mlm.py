"""Masked-language-modelling data: pack token streams into fixed blocks, mask 80/10/10.

BERT-style MLM (Devlin et al., 2019): 15% of non-special tokens are selected; of those 80%
become the mask token, 10% a random token, 10% stay unchanged. Blocks are packed across line
boundaries (each line closed by the separator) so no compute is spent on padding.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import torch

from xlpeft.errors import XlpeftError
from xlpeft.progress import progress as progress_bar


def pack_blocks(tokenizer, lines: Iterable[str], max_seq_len: int, batch_lines: int = 1000,
                progress: bool = True) -> torch.Tensor:
    """Tokenise lines and pack them into blocks ``[CLS] ... [SEP]`` of exactly ``max_seq_len`` tokens.

    Returns:
        LongTensor (N, max_seq_len). The trailing partial block is dropped unless it is the only one.
    """
    body = max_seq_len - 2
    stream: list[int] = []
    blocks: list[torch.Tensor] = []
    sep = tokenizer.sep_token_id
    bar = progress_bar(desc="tokenising", unit=" lines", enabled=progress, leave=False)

    def flush(final: bool) -> None:
        nonlocal stream
        n_full = len(stream) // body
        if n_full:
            chunk = torch.tensor(stream[: n_full * body], dtype=torch.long).view(n_full, body)  # (n, L-2)
            blocks.append(chunk)
            stream = stream[n_full * body:]
        if final and not blocks and stream:  # tiny corpus: pad the one partial block
            pad = [tokenizer.pad_token_id] * (body - len(stream))
            blocks.append(torch.tensor([stream + pad], dtype=torch.long))

    batch: list[str] = []
    for line in _chain(lines):
        batch.append(line)
        if len(batch) >= batch_lines:
            stream.extend(_encode(tokenizer, batch, sep))
            bar.update(len(batch))
            batch = []
            flush(False)
    if batch:
        stream.extend(_encode(tokenizer, batch, sep))
        bar.update(len(batch))
    flush(True)
    bar.close()
    if not blocks:
        raise XlpeftError("the corpus produced no tokens; it needs at least one non-empty line of text")
    body_ids = torch.cat(blocks)  # (N, L-2)
    n = body_ids.shape[0]
    cls = torch.full((n, 1), tokenizer.cls_token_id, dtype=torch.long)
    end = torch.full((n, 1), sep, dtype=torch.long)
    return torch.cat([cls, body_ids, end], dim=1)  # (N, L)


def _chain(lines: Iterable[str]) -> Iterator[str]:
    yield from lines


def _encode(tokenizer, batch: list[str], sep: int) -> list[int]:
    return line_ids(tokenizer(batch, add_special_tokens=False)["input_ids"], sep)


def line_ids(encoded: Iterable[list[int]], sep: int) -> list[int]:
    """The MLM token stream of encoded lines: each non-empty line's ids, then ``sep`` (empty lines add nothing).

    One rule for every reader (:func:`pack_blocks`, the token store, the stream), so they pack the same blocks.
    """
    out: list[int] = []
    for ids in encoded:
        if ids:
            out.extend(ids)
            out.append(sep)
    return out


def split_blocks(blocks, eval_fraction: float, seed: int):
    """Shuffle blocks deterministically and hold out ``eval_fraction`` (at least one block) for evaluation.

    ``blocks`` is a LongTensor (N, L) or a :class:`xlpeft.data.token_store.Blocks` view; a view
    splits into two views (no tokens are read), with the same rows a tensor would give.
    """
    n = blocks.shape[0]
    if n < 2:
        raise XlpeftError(
            f"the corpus packs into {n} block(s) of tokens; at least 2 are needed (one held out for eval). "
            "Use more text or a smaller --set max_seq_len"
        )
    from xlpeft.data.token_store import Blocks

    view = isinstance(blocks, Blocks)  # int32 rows: a 10^9-token corpus is millions of blocks
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed), dtype=torch.int32 if view else torch.int64)
    n_eval = max(1, int(round(n * eval_fraction)))
    if view:
        return blocks.select(order[n_eval:]), blocks.select(order[:n_eval])
    return blocks[order[n_eval:]], blocks[order[:n_eval]]


def special_mask(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T): True where the token is special (CLS/SEP/PAD/...) and must never be masked."""
    specials = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype)
    return torch.isin(input_ids, specials)


def replacement_ids(tokenizer) -> torch.Tensor:
    """The ids a "random token" replacement may draw: the whole vocabulary except special tokens.

    Drawing from ``range(len(tokenizer))`` (as HF's collator does) can insert PAD, CLS or SEP
    into the middle of a block; a PAD there would even be masked out of attention.
    """
    return _non_special_ids(len(tokenizer), frozenset(tokenizer.all_special_ids))


@functools.lru_cache(maxsize=8)
def _non_special_ids(vocab_size: int, specials: frozenset[int]) -> torch.Tensor:
    """Computed once per vocabulary, not once per micro-batch (a Python pass over 250k ids for XLM-R)."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[[i for i in specials if 0 <= i < vocab_size]] = False
    return torch.nonzero(keep).squeeze(1)  # (V - specials,) ascending


def mask_tokens(input_ids: torch.Tensor, tokenizer, probability: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply 80/10/10 MLM masking.

    Args:
        input_ids: LongTensor (B, T).
        tokenizer: provides ``mask_token_id``, special ids and vocabulary size.
        probability: fraction of non-special tokens selected.
        generator: CPU generator, so masking is reproducible for a seed.

    Returns:
        (masked input_ids (B, T), labels (B, T) with -100 where nothing is predicted).
        Random replacements are never special tokens; build the attention mask from the
        *uncorrupted* ``input_ids`` (see :func:`attention_mask_for`).
    """
    inputs = input_ids.clone()
    labels = input_ids.clone()
    probs = torch.full(inputs.shape, probability)
    probs.masked_fill_(special_mask(tokenizer, inputs), 0.0)
    selected = torch.bernoulli(probs, generator=generator).bool()  # (B, T)
    labels[~selected] = -100
    to_mask = torch.bernoulli(torch.full(inputs.shape, 0.8), generator=generator).bool() & selected
    inputs[to_mask] = tokenizer.mask_token_id
    to_random = torch.bernoulli(torch.full(inputs.shape, 0.5), generator=generator).bool() & selected & ~to_mask
    pool = replacement_ids(tokenizer)
    random_ids = pool[torch.randint(len(pool), inputs.shape, generator=generator)]  # (B, T), never special
    inputs[to_random] = random_ids[to_random]
    return inputs, labels


def attention_mask_for(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) long mask, 1 on every non-pad token of the *uncorrupted* batch."""
    return (input_ids != pad_id).long()
