"""Warm-up text for an MLM head: held-out lines chosen by a hash of the line index, caps spread over
a source, and packed blocks that remember which source each token came from.

Used by ``xlpeft prepare-base`` (xlpeft/recipes/prepare_base.py) to hold out lines of every
language's text that its head never trains on, and to report the held-out loss per language.
"""

from __future__ import annotations

import zlib

import torch

from xlpeft.data.corpora import CorpusSpec, iter_lines
from xlpeft.data.mlm import line_ids
from xlpeft.errors import XlpeftError


def is_heldout(index: int, every: int) -> bool:
    """Whether line ``index`` of a source is held out: crc32 of its decimal index is 0 mod ``every``.

    A hash, not "every N-th line" or "the last N", so the held-out lines are spread over every book
    of the Bible, and the rule is the same on every machine (Python's ``hash`` of a str is salted).
    """
    return zlib.crc32(str(index).encode()) % every == 0


def spread(items: list[str], limit: int) -> list[str]:
    """At most ``limit`` items, evenly spaced over ``items`` (all of them when ``limit`` is 0)."""
    if not limit or len(items) <= limit:
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def split_lines(spec: CorpusSpec, every: int, max_lines: int = 0, eval_lines: int = 0) -> tuple[list[str], list[str]]:
    """(training, held-out) lines of one source: line ``i`` is held out when :func:`is_heldout` ``(i, every)``.

    With ``every`` 0 nothing is held out and training takes the first ``max_lines`` lines (0: all),
    as e5-small's warm-up always did. Otherwise both sides are capped after the split, by
    :func:`spread`, so a held-out line is never a training line and capped training text still
    covers the whole source (every book of the Bible), not only its beginning.
    """
    if not every:
        return list(iter_lines(spec, max_lines)), []
    train, held = [], []
    for i, line in enumerate(iter_lines(spec)):
        (held if is_heldout(i, every) else train).append(line)
    return spread(train, max_lines), spread(held, eval_lines)


def pack_labelled(tokenizer, groups: list[list[str]], max_seq_len: int,
                  pad_tail: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`xlpeft.data.mlm.pack_blocks` over the groups' lines in order, remembering each token's group.

    Blocks are the same as ``pack_blocks`` gives for the chained lines (a test checks it), so
    e5-small's warm-up is unchanged. ``pad_tail`` pads the trailing partial block instead of dropping
    it (held-out text is short: a UDHR sample's held-out lines fill two or three blocks).

    Returns:
        blocks LongTensor (N, L) and the group index of each token (N, L), -1 at CLS/SEP columns and padding.
    """
    body, sep = max_seq_len - 2, tokenizer.sep_token_id
    stream: list[int] = []
    owner: list[int] = []
    for g, lines in enumerate(groups):
        for start in range(0, len(lines), 1000):
            chunk = line_ids(tokenizer(lines[start:start + 1000], add_special_tokens=False)["input_ids"], sep)
            stream += chunk
            owner += [g] * len(chunk)
    if not stream:
        raise XlpeftError("the corpus produced no tokens; it needs at least one non-empty line of text")
    n = len(stream) // body
    if len(stream) % body and (pad_tail or not n):  # pack_blocks pads only a lone partial block
        missing = body - len(stream) % body
        stream += [tokenizer.pad_token_id] * missing
        owner += [-1] * missing
        n += 1
    ids = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)  # (N, L-2)
    groups_t = torch.tensor(owner[: n * body], dtype=torch.long).view(n, body)
    edge = torch.full((n, 1), -1, dtype=torch.long)
    blocks = torch.cat([torch.full((n, 1), tokenizer.cls_token_id), ids, torch.full((n, 1), sep)], dim=1)
    return blocks, torch.cat([edge, groups_t, edge], dim=1)  # (N, L) each
