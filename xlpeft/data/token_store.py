"""Tokenise a corpus once, into a memory-mapped token stream on disk that runs, resumes and ranks share.

``train-lang`` used to tokenise the whole corpus before step 1 and hold every token as int64 in
memory, again on every ``--resume`` and on every torchrun rank (issue 20: an 89 MB corpus cost
933 MB of RSS). Now the stream :func:`xlpeft.data.mlm.pack_blocks` would pack (each non-empty
line's ids, then the separator) is written once to ``$XLPEFT_CACHE/tokens/<key>/tokens.bin``
(uint16 when the vocabulary fits, else uint32) and memory-mapped; :class:`Blocks` cuts
``[CLS] body [SEP]`` blocks out of it by index arithmetic, so the blocks are exactly
``pack_blocks``'s for any ``max_seq_len`` and memory does not grow with the corpus.

The key is the corpus content (sha256 of each file, or the ``hf:`` spec), the tokenizer's own
fingerprint (its serialised vocabulary and rules, not the base's weights: two bases that share a
tokenizer share the store), the line limit and :data:`FORMAT`. ``max_seq_len`` is not part of it:
the store holds the stream, not blocks. A store is published by renaming a finished temporary
folder, under an exclusive lock, so a reader never sees a half-written one and concurrent
builders (torchrun ranks, two runs) build it once; a store whose size or checksum does not match
its ``meta.json`` is rebuilt, never read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xlpeft.data.corpora import CorpusSpec, fingerprint_corpora
from xlpeft.errors import XlpeftError

FORMAT = 1
"""Bumped whenever what a store holds changes, so old stores are rebuilt rather than misread."""
CHECK_WORDS = 1 << 19
"""64-bit words per checksum chunk (4 MiB)."""


def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex digits identifying how ``tokenizer`` maps text to ids (its serialised model, not its path)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary and settings
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(getattr(tokenizer, "init_kwargs", {}), sort_keys=True, default=str).encode())
    h.update(json.dumps([tokenizer.sep_token_id, len(tokenizer)]).encode())
    return h.hexdigest()[:16]


def store_key(corpora: list[CorpusSpec], tokenizer, limit: int) -> str:
    """The cache key of ``corpora`` tokenised by ``tokenizer``, at most ``limit`` lines (0: all)."""
    raw = json.dumps([FORMAT, fingerprint_corpora(corpora), tokenizer_fingerprint(tokenizer), int(limit)])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


@dataclass
class TokenStore:
    """A finished store: where its stream is and what built it."""

    path: Path
    meta: dict
    hit: bool  # True when it was already built (by an earlier run, a resume or another rank)

    @property
    def tokens(self) -> np.ndarray:
        """The whole stream, memory-mapped (n_tokens,): for inspection; training reads blocks with ``pread``."""
        n, dtype = int(self.meta["n_tokens"]), np.dtype(self.meta["dtype"])
        return np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r") if n else np.zeros(0, dtype)

    def blocks(self, max_seq_len: int, tokenizer) -> Blocks:
        """The ``[CLS] body [SEP]`` blocks of ``max_seq_len`` tokens that :func:`pack_blocks` would pack."""
        reader = TokenReader(self.path / "tokens.bin", int(self.meta["n_tokens"]), self.meta["dtype"])
        return Blocks(reader, max_seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)


class TokenReader:
    """Reads token ranges of a store with ``os.pread``: only the bytes asked for, never mapped into the process,
    so resident memory stays flat however much of a 10^9-token store a run walks through."""

    def __init__(self, path: Path, n_tokens: int, dtype: str) -> None:
        self.path, self.n, self.dtype = path, n_tokens, np.dtype(dtype)
        self.fd = os.open(path, os.O_RDONLY) if n_tokens else -1

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` (fewer at the end of the stream)."""
        length = max(0, min(length, self.n - start))
        raw = os.pread(self.fd, length * self.dtype.itemsize, start * self.dtype.itemsize) if length else b""
        return np.frombuffer(raw, dtype=self.dtype)

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)


class ArrayReader:
    """:class:`TokenReader`'s interface over an in-memory array (tests, small streams)."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start:start + length]


class Blocks:
    """Blocks read from a token stream on demand: indexing materialises only the rows asked for.

    ``blocks[idx]`` (LongTensor, list, slice or int) -> LongTensor (B, L); :meth:`select` -> a view
    over a subset of rows (the train / held-out split), without reading any tokens.
    """

    def __init__(self, tokens: TokenReader | ArrayReader | np.ndarray, max_seq_len: int, cls: int, sep: int, pad: int,
                 rows: torch.Tensor | None = None) -> None:
        tokens = ArrayReader(tokens) if isinstance(tokens, np.ndarray) else tokens
        self.tokens, self.length, self.cls, self.sep, self.pad = tokens, max_seq_len, cls, sep, pad
        self.body = max_seq_len - 2
        if self.body < 1:
            raise XlpeftError(f"max_seq_len must leave room for [CLS] and [SEP]; got {max_seq_len}")
        n_full = len(tokens) // self.body
        self.n_source = n_full or (1 if len(tokens) else 0)  # a lone partial block is padded, as pack_blocks does
        if self.n_source == 0:
            raise XlpeftError("the corpus produced no tokens; it needs at least one non-empty line of text")
        self.rows = rows  # (N,) int32 source-block indices of this view, or None for all of them

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else self.n_source

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.length)

    def select(self, idx: torch.Tensor) -> Blocks:
        """A view over rows ``idx`` of this one (no tokens are read)."""
        rows = self.rows[idx] if self.rows is not None else idx
        return Blocks(self.tokens, self.length, self.cls, self.sep, self.pad, rows.to(torch.int32))  # a copy

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            key = range(*key.indices(len(self)))
        elif isinstance(key, int):
            return self[[key]][0]
        idx = torch.as_tensor(list(key) if isinstance(key, range) else key, dtype=torch.long).reshape(-1)
        source = self.rows[idx] if self.rows is not None else idx  # (B,)
        out = torch.full((len(source), self.length), self.pad, dtype=torch.long)  # (B, L)
        out[:, 0], out[:, -1] = self.cls, self.sep
        for row, b in enumerate(source.tolist()):
            piece = self.tokens.read(b * self.body, self.body)  # (<= L-2,) only the lone block is short
            out[row, 1:1 + len(piece)] = torch.from_numpy(piece.astype(np.int64))
        return out


def open_store(corpora: list[CorpusSpec], tokenizer, limit: int = 0, *, root: Path | None = None,
               workers: int | None = None, progress: bool = True) -> TokenStore:
    """The store of ``corpora`` x ``tokenizer``: reused when built and intact, else built (once, under a lock).

    Args:
        limit: at most this many lines (``max_corpus_lines``; 0: all).
        root: the cache folder (default ``$XLPEFT_CACHE/tokens``).
        workers: tokenising processes for local files (default ``$XLPEFT_TOKENIZE_WORKERS``, else the CPU count
            for corpora over 64 MB, else 1).
    """
    from xlpeft.data import token_build

    key = store_key(corpora, tokenizer, limit)
    root = Path(root) if root is not None else default_root()
    path = root / key
    found = _verified(path, key)
    if found is not None:
        return _report(TokenStore(path, found, hit=True))
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{key}.lock"):
        found = _verified(path, key)  # another builder may have finished while this one waited
        if found is not None:
            return _report(TokenStore(path, found, hit=True))
        if path.exists():
            print(f"token cache {path} is incomplete or corrupted; rebuilding it", file=sys.stderr, flush=True)
            shutil.rmtree(path)
        tmp = root / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        start = time.perf_counter()
        meta = token_build.build(tmp, corpora, tokenizer, limit, _dtype(tokenizer), workers, progress)
        meta.update(key=key, format=FORMAT, build_seconds=round(time.perf_counter() - start, 3),
                    corpora=[c.describe() for c in corpora], tokenizer=tokenizer_fingerprint(tokenizer), limit=limit)
        meta["checksum"] = checksum(tmp / "tokens.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _fsync_files(tmp)
        os.replace(tmp, path)  # published atomically: readers see all of it or none
        found = _verified(path, key)
        if found is None:
            raise XlpeftError(f"the token cache {path} failed its own check right after it was built; "
                              "the disk may be full or failing (set XLPEFT_CACHE to another folder)")
        return _report(TokenStore(path, found, hit=False))


def default_root() -> Path:
    from xlpeft.models import cache_dir

    return cache_dir() / "tokens"


def checksum(path: Path) -> str:
    """A position-weighted sum of the file's 64-bit words per 4 MiB chunk, the chunks' sums hashed in order.

    Catches truncation, flipped and swapped tokens at several GB/s (verifying a 10^9-token store costs
    about a second), reading with ``readinto`` so the pages are never mapped into this process.
    Not cryptographic: it guards against crashes and bad disks, not against an adversary.
    """
    h = hashlib.sha256(b"xlpeft-token-store-checksum-2")
    words = np.zeros(CHECK_WORDS, dtype=np.uint64)
    weights = np.arange(1, CHECK_WORDS + 1, dtype=np.uint64)
    view = memoryview(words).cast("B")
    size = 0
    with path.open("rb", buffering=0) as fh:
        while got := fh.readinto(view):
            size += got
            n = (got + 7) // 8
            view[got:n * 8] = bytes(n * 8 - got)  # a last partial word is zero-padded
            chunk = words[:n]
            h.update(np.array([chunk.sum(), (chunk * weights[:n]).sum()], dtype=np.uint64).tobytes())
    h.update(str(size).encode())
    return h.hexdigest()[:32]


def _dtype(tokenizer) -> str:
    return "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else "uint32"


def _verified(path: Path, key: str) -> dict | None:
    """The meta of the store at ``path`` when it is complete and intact, else None."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return None
        file = path / "tokens.bin"
        n, dtype = int(meta["n_tokens"]), np.dtype(meta["dtype"])
        if file.stat().st_size != n * dtype.itemsize:
            return None
        if checksum(file) != meta.get("checksum"):
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _report(store: TokenStore) -> TokenStore:
    m = store.meta
    what = "hit" if store.hit else f"built in {m['build_seconds']:.1f} s with {m['workers']} process(es)"
    print(f"token cache {what}: {m['n_tokens']:,} tokens of {m['n_lines']:,} lines ({m['dtype']}) in {store.path}",
          file=sys.stderr, flush=True)
    return store


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (one builder at a time on this machine; waiting ones then find the store)."""
    with path.open("a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync_files(path: Path) -> None:
    for file in path.iterdir():
        with file.open("rb") as fh:
            os.fsync(fh.fileno())
