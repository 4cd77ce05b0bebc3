"""Unlabelled text for language modules: local UTF-8 files or Hugging Face datasets.

A corpus spec is a path (one document or sentence a line) or ``hf:NAME[:CONFIG][:SPLIT]``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

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


SCAN_CHUNK = 1 << 22  # bytes read at a time by the streaming validator


def check_text_file(path: Path) -> str:
    """Fail early, with a fix, on a missing, empty, binary or non-UTF-8 corpus file; return its sha256.

    The file is read once, in :data:`SCAN_CHUNK`-byte pieces (never whole, so a 10 GB corpus costs
    megabytes), decoding UTF-8 as it goes; the first bad byte is named by its offset and line.
    A file that passed is remembered under its (path, size, mtime, inode) in the cache's
    ``fingerprints/`` folder, so later runs and resumes neither re-read nor re-hash it.
    """
    if not path.exists():
        raise XlpeftError(f"corpus file {path} does not exist; pass a UTF-8 text file (one sentence or document a line)")
    if not path.is_file():
        raise XlpeftError(f"corpus {path} is not a file; pass a UTF-8 text file (one sentence or document a line)")
    memo = _memo_path(path)
    try:
        cached = json.loads(memo.read_text(encoding="utf-8")) if memo else None
        if isinstance(cached, dict) and cached.get("utf8") and len(cached.get("sha256", "")) == 64:
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    digest = _scan(path)
    try:  # a read-only cache only costs the scan next time
        if memo:
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(json.dumps({"sha256": digest, "utf8": True, "path": str(path)}), encoding="utf-8")
    except OSError:
        pass
    return digest


def _scan(path: Path) -> str:
    """Validate ``path`` as non-empty UTF-8 text without NUL bytes, streaming; its sha256 hex digest."""
    h = hashlib.sha256()
    offset, lines, carry, seen_text = 0, 0, b"", False  # offset: file position of carry's first byte
    with path.open("rb") as fh:
        while True:
            chunk = fh.read(SCAN_CHUNK)
            h.update(chunk)
            data = carry + chunk
            if not data:
                break
            cut = len(data) if not chunk else utf8_boundary(data)  # at EOF an incomplete tail is an error
            head = data[:cut]
            nul = head.find(b"\x00")
            if nul >= 0:
                line = lines + head.count(b"\n", 0, nul) + 1
                raise XlpeftError(f"corpus file {path} looks binary (a NUL byte at byte {offset + nul}, line {line}); "
                                  "pass a UTF-8 text file")
            try:
                text = head.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = lines + head.count(b"\n", 0, exc.start) + 1
                raise XlpeftError(f"corpus file {path} is not UTF-8 (byte {offset + exc.start}, line {line}: "
                                  f"{exc.reason}); re-encode it, e.g. iconv -t UTF-8") from None
            seen_text = seen_text or bool(text.strip())
            lines += head.count(b"\n")
            offset += cut
            carry = data[cut:]
            if not chunk:
                break
    if not seen_text:
        raise XlpeftError(f"corpus file {path} is empty; it needs at least one non-empty line of text")
    return h.hexdigest()


def utf8_boundary(data: bytes) -> int:
    """The largest cut <= len(data) that does not split a UTF-8 sequence (at most 3 bytes are held back)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: the cut after it is clean
            return len(data) - back + 1
        if byte >= 0xC0:  # a lead byte: complete if its sequence fits in what follows it
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)  # four continuation bytes in a row: invalid anyway, let the decoder name it


def _memo_path(path: Path) -> Path | None:
    """Where the scan of ``path`` is remembered: keyed by its resolved path, size, times, inode and first and
    last 64 KiB (a rewrite in the middle of a file within one tick of the file-system clock is not seen)."""
    from xlpeft.models import cache_dir

    try:
        st = path.stat()
    except OSError:
        return None
    with path.open("rb") as fh:  # the ends too: a same-size rewrite within the clock's tick still differs there
        ends = fh.read(1 << 16)
        fh.seek(max(0, st.st_size - (1 << 16)))
        ends += fh.read(1 << 16)
    stamp = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                        hashlib.sha256(ends).hexdigest()])
    return cache_dir() / "fingerprints" / ("text-" + hashlib.sha256(stamp.encode()).hexdigest()[:32])


MAX_LINE_CHARS = 10_000  # a longer "line" (a whole book without newlines) is cut into pieces at spaces


def iter_lines(spec: CorpusSpec, limit: int = 0) -> Iterator[str]:
    """Yield non-empty stripped lines of text (at most ``limit`` if > 0).

    Lines longer than :data:`MAX_LINE_CHARS` are split at whitespace while streaming, so a corpus
    without newlines costs memory in proportion to a piece, not to the file.
    """
    yield from clean_lines(_raw_lines(spec), limit)


def clean_lines(raw: Iterable[str], limit: int = 0) -> Iterator[str]:
    """Raw lines -> the non-empty, stripped pieces of at most :data:`MAX_LINE_CHARS` (at most ``limit`` if > 0)."""
    count = 0
    for line in raw:
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
    with path.open(encoding="utf-8") as fh:
        yield from read_pieces(fh, chunk)


def read_pieces(fh: TextIO, chunk: int = 1 << 20) -> Iterator[str]:
    """:func:`_read_pieces` over an open text stream (the token store reads byte ranges of a file this way)."""
    carry = ""
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
    """Content fingerprint of corpora: local files by their sha256 (memoised by :func:`check_text_file`, so a
    warm start of a 10 GB corpus does not re-hash it), hub corpora by their spec."""
    h = hashlib.sha256()
    for s in specs:
        h.update((f"file:{Path(s.path).name}:{check_text_file(Path(s.path))}" if s.path else s.describe()).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _raw_lines(spec: CorpusSpec) -> Iterator[str]:
    if spec.path is not None:
        path = Path(spec.path)
        check_text_file(path)
        yield from _read_pieces(path)
        return
    for text in hf_texts(spec):
        yield from text.splitlines()


def hf_texts(spec: CorpusSpec, skip: int = 0) -> Iterator[str]:
    """The ``text_field`` of each row of an ``hf:`` corpus, from row ``skip`` on (rows before it are read, not kept)."""
    ds = open_hf(spec)
    for row in ds.skip(skip) if skip else ds:
        if spec.text_field not in row:
            raise XlpeftError(f"dataset {spec.describe()} has no field {spec.text_field!r}; fields: {sorted(row)}")
        yield str(row[spec.text_field])


def open_hf(spec: CorpusSpec):
    """The ``hf:`` corpus as a streaming ``datasets.IterableDataset`` (nothing is downloaded before it is read)."""
    try:
        from datasets import load_dataset

        return load_dataset(spec.hf, spec.config, split=spec.split, streaming=True)
    except Exception as exc:  # offline, unknown dataset, missing config ...
        raise XlpeftError(
            f"could not open Hugging Face dataset {spec.describe()} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a local text file with --corpus PATH"
        ) from None
