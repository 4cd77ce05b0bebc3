"""Raw text into examples: what ``xlpeft predict`` tags (words) or classifies (``premise<TAB>hypothesis``)."""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from typing import TYPE_CHECKING

from xlpeft.data.tasks import PairExample, TokenExample
from xlpeft.errors import XlpeftError

if TYPE_CHECKING:
    from xlpeft.packs import TaskPack


@functools.cache
def _word_pattern() -> re.Pattern:
    """A word (letters, digits and combining marks, joined by inner hyphens or apostrophes) or one punctuation mark.

    Python's ``\\w`` leaves out combining marks (Unicode M*): Devanagari vowel signs and viramas, Khmer
    and Thai vowels, Arabic harakat. Without them a Hindi or Khmer word fell apart at every sign, each
    piece tagged on its own. The marks are gathered once, at first use.
    """
    planes = itertools.chain(range(0x20000), range(0xE0000, 0xE0200))  # the marks' planes: BMP, SMP, variation selectors
    marks = re.escape("".join(chr(c) for c in planes if unicodedata.category(chr(c)).startswith("M")))
    char = rf"[\w{marks}]"
    return re.compile(rf"{char}+(?:[-'’]{char}+)*|[^\w\s{marks}]", re.UNICODE)


def tokenize_words(line: str) -> list[str]:
    """Split raw text into words and punctuation (Unicode-aware, so Ge'ez and Latin scripts both work).

    Invisible format characters (Unicode category Cf: zero-width space and joiners, soft hyphen,
    BOM, direction marks and isolates) are dropped first: as tokens of their own they would shift
    every later tag.
    """
    visible = "".join(ch for ch in line if unicodedata.category(ch) != "Cf")
    return _word_pattern().findall(visible)


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
