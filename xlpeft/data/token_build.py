"""Building a token store (:mod:`xlpeft.data.token_store`): local files in parallel byte ranges, hub corpora in order.

A file is cut into ranges of about :data:`RANGE_BYTES` that start at line starts; each range is
read with the same line rules as :func:`xlpeft.data.corpora.iter_lines` (universal newlines,
long lines cut at spaces, blank lines dropped), tokenised in batches by one worker process and
written as a part file; the parts are appended to ``tokens.bin`` in file order, so the stream is
the one a single sequential pass gives, whatever the number of workers. A line limit or an
``hf:`` corpus is read in one sequential pass (the limit counts lines in order).
"""

from __future__ import annotations

import io
import itertools
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from xlpeft.data.corpora import CorpusSpec, check_text_file, clean_lines, iter_lines, read_pieces
from xlpeft.data.mlm import line_ids
from xlpeft.errors import XlpeftError
from xlpeft.progress import progress as progress_bar

RANGE_BYTES = 8 << 20
"""Bytes of a file per worker task (cut at the next line end)."""
PARALLEL_FROM_BYTES = 64 << 20
"""Local corpora smaller than this are tokenised in-process (worker start-up would cost more than it saves)."""
BATCH_LINES = 2000
"""Lines tokenised per call (a fast tokenizer parallelises within a call when it runs alone)."""

_TOKENIZER = None  # the tokenizer of the build in progress, inherited by forked workers


def build(out: Path, corpora: list[CorpusSpec], tokenizer, limit: int, dtype: str, workers: int | None,
          progress: bool) -> dict:
    """Write ``out/tokens.bin``; returns ``{"n_tokens", "n_lines", "dtype", "workers"}``."""
    sep = int(tokenizer.sep_token_id)
    files = [Path(c.path) for c in corpora if c.path]
    for f in files:
        check_text_file(f)  # streaming, memoised: a bad byte is reported before any work is spent
    target = out / "tokens.bin"
    if limit or len(files) < len(corpora):
        lines = itertools.chain.from_iterable(iter_lines(c, limit) for c in corpora)
        n_tokens, n_lines = _write_lines(tokenizer, lines, sep, dtype, target, progress)
        return {"n_tokens": n_tokens, "n_lines": n_lines, "dtype": dtype, "workers": 1}
    ranges = [(f, a, b) for f in files for a, b in line_ranges(f)]
    total = sum(b - a for _, a, b in ranges)
    n_workers = _workers(workers, total, len(ranges))
    tasks = [(str(f), a, b, str(out / f"part-{i:06d}.bin"), dtype, sep) for i, (f, a, b) in enumerate(ranges)]
    bar = progress_bar(total=round(total / 1e6, 1), desc="tokenising", unit=" MB", enabled=progress, leave=False)
    n_tokens = n_lines = 0
    global _TOKENIZER
    _TOKENIZER = tokenizer
    try:
        with target.open("wb") as sink:
            for (_, a, b), (part, t, n) in zip(ranges, _run(tasks, n_workers), strict=True):
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, sink, 1 << 22)
                os.unlink(part)
                n_tokens, n_lines = n_tokens + t, n_lines + n
                bar.update((b - a) / 1e6)
    finally:
        _TOKENIZER = None
        bar.close()
    return {"n_tokens": n_tokens, "n_lines": n_lines, "dtype": dtype, "workers": n_workers}


def line_ranges(path: Path, size: int | None = None) -> list[tuple[int, int]]:
    """Byte ranges ``[a, b)`` covering ``path``, each about ``size`` (:data:`RANGE_BYTES`) bytes, from line starts."""
    size = size or RANGE_BYTES
    total = path.stat().st_size
    cuts = [0]
    with path.open("rb") as fh:
        while cuts[-1] + size < total:
            fh.seek(cuts[-1] + size)
            while True:
                piece = fh.read(1 << 16)
                if not piece:
                    break
                nl = piece.find(b"\n")
                if nl >= 0:
                    fh.seek(fh.tell() - len(piece) + nl + 1)
                    break
            if fh.tell() >= total:
                break
            cuts.append(fh.tell())
    cuts.append(total)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _workers(asked: int | None, total: int, n_ranges: int) -> int:
    env = os.environ.get("XLPEFT_TOKENIZE_WORKERS", "")
    if asked is None and env:
        if not env.isdigit() or int(env) < 1:
            raise XlpeftError(f"XLPEFT_TOKENIZE_WORKERS must be a positive integer; got {env!r}")
        asked = int(env)
    if asked is None:
        asked = (os.cpu_count() or 1) if total >= PARALLEL_FROM_BYTES else 1
    return max(1, min(asked, n_ranges))


def _run(tasks: list[tuple], n_workers: int) -> Iterator[tuple[str, int, int]]:
    """Each task's (part file, tokens, lines), in task order."""
    if n_workers == 1:
        yield from (_tokenise_range(t) for t in tasks)
        return
    ctx = multiprocessing.get_context("fork")  # workers inherit the loaded tokenizer instead of re-loading it
    with ctx.Pool(n_workers, initializer=_quiet_child) as pool:
        yield from pool.imap(_tokenise_range, tasks, chunksize=1)


def _quiet_child() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; the pool is the parallelism


def _tokenise_range(task: tuple) -> tuple[str, int, int]:
    path, start, end, part, dtype, sep = task
    with open(path, "rb") as fh:
        fh.seek(start)
        raw = fh.read(end - start)
    text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")  # the same newline rules as reading the whole file
    n_tokens, n_lines = _write_lines(_TOKENIZER, clean_lines(read_pieces(text)), sep, dtype, Path(part), False)
    return part, n_tokens, n_lines


def _write_lines(tokenizer, lines: Iterable[str], sep: int, dtype: str, target: Path,
                 progress: bool) -> tuple[int, int]:
    """Tokenise ``lines`` in batches and append each line's ids and ``sep`` to ``target``; (tokens, lines)."""
    n_tokens = n_lines = 0
    bar = progress_bar(desc="tokenising", unit=" lines", enabled=progress, leave=False)
    it = iter(lines)
    encode = encoder(tokenizer)
    with target.open("wb") as sink:
        while batch := list(itertools.islice(it, BATCH_LINES)):
            stream = line_ids(encode(batch), sep)
            sink.write(np.asarray(stream, dtype=dtype).tobytes())
            n_tokens += len(stream)
            n_lines += len(batch)
            bar.update(len(batch))
    bar.close()
    return n_tokens, n_lines


def encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """Lines -> ids without special tokens: the fast tokenizer's own batch call when there is one.

    ``encode_batch_fast`` skips the offsets, attention masks and type ids ``tokenizer(...)`` builds and
    throws away here; the ids are the same (the store's tests compare it with ``pack_blocks``).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None:
        return lambda batch: tokenizer(batch, add_special_tokens=False)["input_ids"]
    return lambda batch: [e.ids for e in fast(batch, add_special_tokens=False)]
