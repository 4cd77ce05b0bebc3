"""Unlabelled text for language modules: local UTF-8 files or Hugging Face datasets.

A corpus spec is a path (one document or sentence a line) or ``hf:NAME[:CONFIG][:SPLIT]``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from xlpeft.errors import XlpeftError


@dataclass(frozen=True)
class CorpusSpec:
    """Where text comes from. Exactly one of ``path`` or ``hf`` is set."""

    path: str | None = None
    hf: str | None = None  # dataset name on the hub
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    def __post_init__(self) -> None:
        if (self.path is None) == (self.hf is None):
            raise XlpeftError(f"a corpus needs exactly one of `path` or `hf`; got path={self.path!r}, hf={self.hf!r}")

    def describe(self) -> str:
        if self.path:
            return self.path
        return ":".join(["hf", self.hf or "", self.config or "", self.split]).replace("::", ":")


def parse_hf_spec(spec: str, what: str = "corpus") -> dict[str, str | None]:
    """``hf:NAME[:CONFIG][:SPLIT]`` -> ``{"hf": NAME, "config": CONFIG or None, "split": SPLIT or "train"}``."""
    parts = spec[3:].split(":")
    if not spec.startswith("hf:") or not parts[0] or len(parts) > 3:
        raise XlpeftError(f"hf {what} spec should be hf:NAME[:CONFIG][:SPLIT]; got {spec!r}")
    return {"hf": parts[0], "config": (parts[1] or None) if len(parts) > 1 else None,
            "split": parts[2] if len(parts) > 2 and parts[2] else "train"}


def parse_corpus(spec: str, base_dir: Path | None = None) -> CorpusSpec:
    """Parse a ``--corpus`` value: ``hf:NAME[:CONFIG][:SPLIT]`` or a file path."""
    if spec.startswith("hf:"):
        return CorpusSpec(**parse_hf_spec(spec))
    path = Path(spec)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return CorpusSpec(path=str(path))


def check_text_file(path: Path) -> None:
    """Fail early, with a fix, on a missing, empty, binary or non-UTF-8 corpus file."""
    if not path.exists():
        raise XlpeftError(f"corpus file {path} does not exist; pass a UTF-8 text file (one sentence or document a line)")
    if not path.is_file():
        raise XlpeftError(f"corpus {path} is not a file; pass a UTF-8 text file (one sentence or document a line)")
    head = path.open("rb").read(1 << 16)
    if b"\x00" in head:
        raise XlpeftError(f"corpus file {path} looks binary (NUL bytes); pass a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise XlpeftError(
            f"corpus file {path} is not UTF-8 (byte {exc.start}: {exc.reason}); re-encode it, e.g. iconv -t UTF-8"
        ) from None
    if not text.strip():
        raise XlpeftError(f"corpus file {path} is empty; it needs at least one non-empty line of text")


MAX_LINE_CHARS = 10_000  # a longer "line" (a whole book without newlines) is cut into pieces at spaces


def iter_lines(spec: CorpusSpec, limit: int = 0) -> Iterator[str]:
    """Yield non-empty stripped lines of text (at most ``limit`` if > 0).

    Lines longer than :data:`MAX_LINE_CHARS` are split at whitespace while streaming, so a corpus
    without newlines costs memory in proportion to a piece, not to the file.
    """
    count = 0
    for line in _raw_lines(spec):
        for piece in split_long(line):
            piece = piece.strip()
            if not piece:
                continue
            yield piece
            count += 1
            if limit and count >= limit:
                return


def split_long(text: str, limit: int = MAX_LINE_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at the last whitespace before the limit."""
    while len(text) > limit:
        cut = max(text.rfind(" ", 0, limit), text.rfind("\t", 0, limit))
        cut = cut if cut > 0 else limit  # no space at all (e.g. Thai, Chinese): a hard cut
        yield text[:cut]
        text = text[cut:]
    yield text


def _read_pieces(path: Path, chunk: int = 1 << 20) -> Iterator[str]:
    """Lines of a UTF-8 file; a line of megabytes arrives in ~``chunk``-character pieces cut at spaces."""
    carry = ""
    with path.open(encoding="utf-8") as fh:
        while True:
            block = fh.readline(chunk)
            if not block:
                if carry:
                    yield carry
                return
            block, carry = carry + block, ""
            if not block.endswith("\n") and len(block) >= chunk:
                head, sep, tail = block.rpartition(" ")
                if sep and len(tail) < chunk:  # the word cut by the chunk goes with the next piece
                    block, carry = head, tail
            yield block


def fingerprint_files(paths: Iterable[str | Path | None], extra: Iterable[str] = ()) -> str:
    """sha256 (16 hex digits) of the files' bytes and ``extra`` strings: changes when any content changes.

    Recorded in a run's params so ``--resume`` refuses to continue on rewritten data of the same size.
    """
    h = hashlib.sha256()
    for p in paths:
        if p is None:
            continue
        h.update(str(Path(p).name).encode() + b"\0")
        with Path(p).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        h.update(b"\0")
    for text in extra:
        h.update(text.encode() + b"\0")
    return h.hexdigest()[:16]


def fingerprint_corpora(specs: Iterable[CorpusSpec]) -> str:
    """Content fingerprint of local corpus files; hub corpora contribute their spec."""
    specs = list(specs)
    return fingerprint_files([s.path for s in specs if s.path], [s.describe() for s in specs if not s.path])


def _raw_lines(spec: CorpusSpec) -> Iterator[str]:
    if spec.path is not None:
        path = Path(spec.path)
        check_text_file(path)
        yield from _read_pieces(path)
        return
    try:
        from datasets import load_dataset

        ds = load_dataset(spec.hf, spec.config, split=spec.split, streaming=True)
    except Exception as exc:  # offline, unknown dataset, missing config ...
        raise XlpeftError(
            f"could not open Hugging Face dataset {spec.describe()} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a local text file with --corpus PATH"
        ) from None
    for row in ds:
        if spec.text_field not in row:
            raise XlpeftError(f"dataset {spec.describe()} has no field {spec.text_field!r}; fields: {sorted(row)}")
        yield from str(row[spec.text_field]).splitlines()
