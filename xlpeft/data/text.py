"""Raw text into examples: what ``xlpeft predict`` tags (words) or classifies (``premise<TAB>hypothesis``)."""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from xlpeft.data.tasks import PairExample, TokenExample
from xlpeft.errors import XlpeftError

if TYPE_CHECKING:
    from xlpeft.packs import TaskPack

WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]", re.UNICODE)
"""A word (letters/digits, joined by inner hyphens or apostrophes) or one punctuation mark."""


def tokenize_words(line: str) -> list[str]:
    """Split raw text into words and punctuation (Unicode-aware, so Ge'ez and Latin scripts both work).

    Invisible format characters (Unicode category Cf: zero-width space and joiners, soft hyphen,
    BOM, direction marks and isolates) are dropped first: as tokens of their own they would shift
    every later tag.
    """
    visible = "".join(ch for ch in line if unicodedata.category(ch) != "Cf")
    return WORD.findall(visible)


def examples_from_lines(pack: TaskPack, lines: list[str]) -> tuple[list, list[int]]:
    """One example per input line (labels are placeholders), and the indices of the lines to predict.

    Token tasks split each line into words (:func:`tokenize_words`); pair tasks read
    ``premise<TAB>hypothesis``. Blank lines get an empty example and are not predicted, so the
    output still matches the input line by line.

    Raises:
        XlpeftError: a non-blank line of a pair task has no tab (its number is named).
    """
    fallback = pack.labels[0]
    if pack.head == "token_classification":
        words = [tokenize_words(line) for line in lines]
        return [TokenExample(tuple(w), (fallback,) * len(w)) for w in words], [i for i, w in enumerate(words) if w]
    pairs = [line.split("\t", 1) for line in lines]
    bad = next((n for n, (line, p) in enumerate(zip(lines, pairs, strict=True), 1) if line.strip() and len(p) != 2),
               None)
    if bad is not None:
        raise XlpeftError(f"{pack.task} prediction reads `premise<TAB>hypothesis` lines; line {bad} has no tab")
    examples = [PairExample(p[0], p[1], fallback) if len(p) == 2 else PairExample("", "", fallback) for p in pairs]
    return examples, [i for i, line in enumerate(lines) if line.strip()]
