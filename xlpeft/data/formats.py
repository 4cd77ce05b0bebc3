"""Readers for labelled files: CoNLL (``token<TAB>tag``), CoNLL-U (UPOS) and JSONL (premise/hypothesis/label).

They live apart from :mod:`xlpeft.data.tasks` (sources, label checks, encoding), which
re-exports them, so ``from xlpeft.data.tasks import read_conllu`` keeps working.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlpeft.errors import XlpeftError


@dataclass(frozen=True)
class TokenExample:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class PairExample:
    premise: str
    hypothesis: str
    label: str


def open_text(path: Path) -> list[str]:
    """The lines of a UTF-8 task file, or an error saying what is wrong with it."""
    if path.is_dir():
        raise XlpeftError(f"task data {path} is a directory; pass a CoNLL, CoNLL-U or JSONL file inside it")
    if not path.is_file():
        raise XlpeftError(f"task data file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise XlpeftError(f"task data file {path} is not UTF-8; re-encode it") from None


def read_conll(path: Path) -> list[TokenExample]:
    """``token<TAB>tag`` (or whitespace-separated; first column token, last column tag), blank line between sentences."""
    examples, tokens, tags = [], [], []
    for n, line in enumerate(open_text(path), 1):
        line = line.strip()
        if not line or line.startswith("-DOCSTART-"):
            if tokens:
                examples.append(TokenExample(tuple(tokens), tuple(tags)))
                tokens, tags = [], []
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) < 2:
            raise XlpeftError(f"{path}:{n}: expected `token<TAB>tag`, got {line!r}")
        tokens.append(cols[0])
        tags.append(cols[-1])
    if tokens:
        examples.append(TokenExample(tuple(tokens), tuple(tags)))
    return examples


_WORD_ID = re.compile(r"[1-9][0-9]*")
_SKIPPED_ID = re.compile(r"[1-9][0-9]*-[1-9][0-9]*|[0-9]+\.[1-9][0-9]*")  # multi-word token | empty node


def conllu_sentences(lines: Iterable[str], where: str) -> Iterator[tuple[list[str], list[list[str]]]]:
    """Sentences of CoNLL-U text: (comment lines, the 10 columns of each syntactic word).

    Multi-word token lines (``1-2  don't``) are skipped because their words (``1 do``,
    ``2 n't``) follow with their own UPOS; empty nodes (``5.1``) are skipped because they have
    no surface form. ``SpaceAfter=No`` in MISC only says how words are written, so such words
    stay separate words (a treebank-specific rule that joins them, such as Turkish inflectional
    groups, belongs to that treebank's converter).

    Raises:
        XlpeftError: a line without 10 tab-separated columns, or an ID that is not a word, a range or an empty node.
    """
    comments: list[str] = []
    rows: list[list[str]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            if rows:
                yield comments, rows
            comments, rows = [], []
            continue
        if line.startswith("#"):
            comments.append(line)
            continue
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) != 10:
            raise XlpeftError(f"{where}:{n}: CoNLL-U lines have 10 tab-separated columns; got {len(cols)}")
        if _SKIPPED_ID.fullmatch(cols[0]):
            continue
        if not _WORD_ID.fullmatch(cols[0]):
            raise XlpeftError(f"{where}:{n}: a CoNLL-U ID is a word number (3), a range (3-4) or an empty node "
                              f"(3.1); got {cols[0][:20]!r}")
        rows.append(cols)
    if rows:
        yield comments, rows


def read_conllu(path: Path) -> list[TokenExample]:
    """CoNLL-U: FORM (column 2) and UPOS (column 4) of each syntactic word; see :func:`conllu_sentences`."""
    return [TokenExample(tuple(r[1] for r in rows), tuple(r[3] for r in rows))
            for _, rows in conllu_sentences(open_text(path), str(path))]


def read_jsonl(path: Path, labels: list[str]) -> list[PairExample]:
    """One JSON object a line with ``premise``, ``hypothesis``, ``label`` (a name, or an index into ``labels``).

    ``label`` -1 (XNLI's "no gold label") is skipped and counted, as on the hub path; any other
    type or index is refused with its line number rather than mapped to some label.
    """
    examples, skipped = [], 0
    for n, line in enumerate(open_text(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise XlpeftError(f"{path}:{n}: not a JSON object ({str(exc)[:120]})") from None
        if not isinstance(row, dict) or not {"premise", "hypothesis", "label"} <= set(row):
            raise XlpeftError(f"{path}:{n}: expected a JSON object with premise, hypothesis, label; "
                              f"got {brief_json(row)}")
        label = row["label"]
        if label == -1 and isinstance(label, int) and not isinstance(label, bool):
            skipped += 1
            continue
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise XlpeftError(f"{path}:{n}: `label` should be a label name or an index 0..{len(labels) - 1} "
                              f"(-1: no gold label, skipped); got {brief_json(label)}")
        if isinstance(label, int):
            if not 0 <= label < len(labels):
                raise XlpeftError(f"{path}:{n}: `label` index {label} is outside 0..{len(labels) - 1} "
                                  f"({', '.join(labels)}); -1 marks an example without a gold label")
            label = labels[label]
        for key in ("premise", "hypothesis"):
            if not isinstance(row[key], str):
                raise XlpeftError(f"{path}:{n}: `{key}` should be a string; got {brief_json(row[key])}")
        examples.append(PairExample(row["premise"], row["hypothesis"], label))
    if skipped:
        print(f"note: {path}: skipped {skipped} example(s) labelled -1 (no gold label)", file=sys.stderr)
    return examples


def brief_json(value: Any, limit: int = 80) -> str:
    """``value`` as JSON, cut to ``limit`` characters for an error message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
