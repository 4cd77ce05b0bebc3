"""Streaming MLM blocks: tokenise ahead of training in a bounded buffer, for corpora bigger than a run needs.

A CC-100 or Wikipedia dump read through the token store (:mod:`xlpeft.data.token_store`) is tokenised
whole before step 1; streamed (``--set corpus_mode=stream``, the default for ``hf:`` corpora) a
background thread reads and tokenises ahead of the training loop into a queue of at most
:data:`QUEUE_BLOCKS` blocks (the fast tokenizer releases the GIL, so it overlaps the step), and
only what the run consumes is read, downloaded or tokenised.

* Held out: the first ``n_eval`` blocks of the stream, a fixed and reproducible set, never trained on.
* Order: a shuffle buffer of ``stream_buffer`` blocks (as ``datasets.IterableDataset.shuffle``):
  each drawn block is replaced by the next one of the stream; a global permutation is what a
  stream gives up. When the stream ends, the next epoch reads it again from after the held-out blocks.
* Resume: every block carries the :class:`Position` of the token after it (a file's byte offset of
  a line, or a dataset's row, and tokens into it), so the checkpoint holds the buffer, that position
  and the generator, and a resumed run re-opens the source there: bit-identical batches, and nothing
  consumed is tokenised again (a hub dataset's rows before it are skipped, not tokenised).
* torchrun: rank 0 reads and tokenises; every batch is broadcast to the other ranks.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from xlpeft.data.corpora import CorpusSpec, clean_lines, hf_texts, utf8_boundary
from xlpeft.data.mlm import line_ids
from xlpeft.data.token_build import encoder
from xlpeft.errors import XlpeftError

QUEUE_BLOCKS = 4096
"""Blocks tokenised ahead of the loop at most (the bounded buffer)."""
UNIT_BYTES = 1 << 20
"""A line longer than this is read in pieces cut at a space (as :func:`xlpeft.data.corpora.iter_lines` does)."""
UNITS_PER_CALL = 512
"""Units tokenised per tokenizer call."""


@dataclass(frozen=True)
class Position:
    """Where a block starts: corpus index, unit (a file's byte offset, or a dataset's row) and tokens into it."""

    corpus: int = 0
    unit: int = 0
    skip: int = 0

    def tensor(self) -> torch.Tensor:
        return torch.tensor([self.corpus, self.unit, self.skip], dtype=torch.long)

    @staticmethod
    def of(t: torch.Tensor) -> Position:
        return Position(*(int(x) for x in t.tolist()))


def _file_units(path: Path, start: int) -> Iterator[tuple[int, str, int]]:
    """(byte offset, text, offset of the next unit) of each line from ``start``; long lines in pieces cut at spaces."""
    with path.open("rb") as fh:
        fh.seek(start)
        offset = start
        while raw := fh.readline(UNIT_BYTES):
            if not raw.endswith(b"\n") and len(raw) >= UNIT_BYTES:
                cut = raw.rfind(b" ") + 1 or utf8_boundary(raw)  # a space is always a character boundary
                raw = raw[:cut]
                fh.seek(offset + cut)
            yield offset, raw.decode("utf-8"), offset + len(raw)
            offset += len(raw)


def _units(spec: CorpusSpec, start: int) -> Iterator[tuple[int, list[str], int]]:
    """(unit, its raw lines, next unit) from ``start``: the line rules of :func:`xlpeft.data.corpora.iter_lines`."""
    if spec.path is not None:
        for offset, text, after in _file_units(Path(spec.path), start):
            yield offset, text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), after  # universal newlines
        return
    for i, text in enumerate(hf_texts(spec, start), start):  # skipped rows are read, never tokenised
        yield i, text.splitlines(), i + 1


def stream_blocks(corpora: list[CorpusSpec], tokenizer, max_seq_len: int,
                  start: Position = Position()) -> Iterator[tuple[torch.Tensor, Position]]:
    """``[CLS] body [SEP]`` blocks (L,) from ``start`` on, each with the position of the block after it.

    The token stream is :func:`xlpeft.data.mlm.pack_blocks`'s (each non-empty line's ids, then the
    separator), so from the start it gives pack_blocks's blocks in order (its trailing partial block dropped).
    """
    body, sep, encode = max_seq_len - 2, int(tokenizer.sep_token_id), encoder(tokenizer)
    head, tail = torch.tensor([tokenizer.cls_token_id]), torch.tensor([sep])
    carry: list[int] = []
    skip = start.skip  # a resumed unit's first tokens went into earlier blocks
    for c in range(start.corpus, len(corpora)):
        units = _units(corpora[c], start.unit if c == start.corpus else 0)
        while batch := [u for _, u in zip(range(UNITS_PER_CALL), units, strict=False)]:
            pieces = [list(clean_lines(lines)) for _, lines, _ in batch]
            flat = encode([p for ps in pieces for p in ps]) if any(pieces) else []
            k = 0
            for (unit, _, next_unit), ps in zip(batch, pieces, strict=True):
                tokens = line_ids(flat[k:k + len(ps)], sep)
                k += len(ps)
                i, skip = skip, 0
                while len(carry) + len(tokens) - i >= body:
                    take = body - len(carry)
                    block = torch.cat([head, torch.tensor(carry + tokens[i:i + take], dtype=torch.long), tail])  # (L,)
                    carry, i = [], i + take
                    yield block, Position(c, unit, i) if i < len(tokens) else Position(c, next_unit, 0)
                carry += tokens[i:]


def corpus_mode(cfg, corpora: list[CorpusSpec]) -> str:
    """``cache`` or ``stream``: ``corpus_mode``, where ``auto`` streams ``hf:`` corpora and caches local files."""
    if cfg.corpus_mode != "auto":
        return cfg.corpus_mode
    return "stream" if any(c.hf for c in corpora) else "cache"


def check_streamable(method_cfg, cfg=None) -> None:
    """Epoch-based phases need the corpus size, which a stream does not know, and a line limit is the cache's:
    refuse them, with the fix."""
    if cfg is not None and cfg.max_corpus_lines:
        raise XlpeftError(f"max_corpus_lines={cfg.max_corpus_lines} limits a cached corpus; a streamed one is read only "
                          "as far as the run needs. Drop it, or pass --set corpus_mode=cache")
    epochs = [f.name for f in fields(method_cfg) if f.name.endswith("_epochs") and getattr(method_cfg, f.name)]
    if epochs:
        raise XlpeftError(f"{', '.join(epochs)} count epochs of the corpus, and a streamed corpus has no known size; "
                          "give the phases in steps (e.g. --set full_steps=N --set sparse_steps=M) or pass "
                          "--set corpus_mode=cache")


class _Producer:
    """:func:`stream_blocks` in a daemon thread, into a bounded queue; errors re-raised in the consumer."""

    DONE = object()

    def __init__(self, corpora, tokenizer, max_seq_len: int, start: Position) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_BLOCKS)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(corpora, tokenizer, max_seq_len, start), daemon=True,
                                       name="xlpeft-stream")
        self.thread.start()

    def _run(self, corpora, tokenizer, max_seq_len, start) -> None:
        try:
            for item in stream_blocks(corpora, tokenizer, max_seq_len, start):
                if not self._put(item):
                    return
            self._put(self.DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(exc)

    def _put(self, item) -> bool:
        """Queue ``item``, waiting while the queue is full; False once the consumer has closed the stream."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> tuple[torch.Tensor, Position] | None:
        item = self.queue.get()
        if item is self.DONE:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


class StreamBatches:
    """Endless shuffled batches (B, L) from a stream, with a fixed held-out set; resumable like ``BlockBatches``.

    Args:
        n_eval: blocks held out from the start of the stream (:attr:`eval_blocks`, (n_eval, L)).
        buffer: the shuffle buffer, in blocks.
        dist: under torchrun rank 0 reads the stream and broadcasts each batch; the other ranks only receive.
    """

    def __init__(self, corpora: list[CorpusSpec], tokenizer, max_seq_len: int, batch_size: int,
                 generator: torch.Generator, n_eval: int, buffer: int, dist) -> None:
        self.corpora, self.tokenizer, self.length = corpora, tokenizer, max_seq_len
        self.batch_size, self.generator, self.buffer_size, self.dist = batch_size, generator, buffer, dist
        self.producer: _Producer | None = None
        self.buffer: list[torch.Tensor] = []
        self.epoch, self.exhausted, self.pos, self.train_start = 0, False, Position(), Position()
        held: list[torch.Tensor] = []
        if dist.main:
            print(f"stream: reading {', '.join(c.describe() for c in corpora)} ahead of training ({n_eval} blocks held "
                  f"out from its start, a shuffle buffer of {buffer})", file=sys.stderr, flush=True)
            self._start(Position())
            while len(held) < n_eval and (block := self._pull()) is not None:
                held.append(block)
            self.train_start = self.pos  # the first block after the held-out set
            first = self._pull()
            if first is None:
                self.close()
                raise XlpeftError(
                    f"the corpus streams into {len(held)} block(s) of {max_seq_len} tokens, all held out for "
                    f"evaluation ({n_eval} wanted) with none left to train on; for a corpus this small pass "
                    "--set corpus_mode=cache (it holds out a fraction instead), or use more text")
            self.buffer.append(first)
        n = int(self._broadcast(torch.tensor([len(held)]))[0])
        self.eval_blocks = self._broadcast(torch.stack(held) if held else torch.zeros((n, max_seq_len), dtype=torch.long))

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if not self.dist.main:
            return self._broadcast(torch.zeros((self.batch_size, self.length), dtype=torch.long))
        out: list[torch.Tensor] = []
        while len(out) < self.batch_size:
            self._fill()
            if not self.buffer:  # the stream is used up: the next epoch reads it again, after the held-out set
                self.epoch += 1
                self._start(self.train_start)
                continue
            j = int(torch.randint(len(self.buffer), (1,), generator=self.generator))
            out.append(self.buffer[j])
            refill = self._pull()
            if refill is not None:
                self.buffer[j] = refill
            else:
                self.buffer[j] = self.buffer[-1]
                self.buffer.pop()
        return self._broadcast(torch.stack(out))  # (B, L)

    def _pull(self) -> torch.Tensor | None:
        if self.exhausted or self.producer is None:
            return None
        item = self.producer.next()
        if item is None:
            self.exhausted = True
            return None
        self.pos = item[1]
        return item[0]

    def _fill(self) -> None:
        while len(self.buffer) < self.buffer_size and (block := self._pull()) is not None:
            self.buffer.append(block)

    def _start(self, pos: Position) -> None:
        self.close()
        self.producer, self.pos, self.exhausted = _Producer(self.corpora, self.tokenizer, self.length, pos), pos, False

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.dist.broadcast(tensor) if self.dist.active else tensor

    def state_dict(self) -> dict[str, torch.Tensor]:
        buffer = torch.stack(self.buffer) if self.buffer else torch.zeros((0, self.length), dtype=torch.long)
        flags = [int(self.exhausted), self.epoch]
        return {"data.stream.buffer": buffer.to(torch.int32), "data.stream.pos": self.pos.tensor(),
                "data.stream.train_start": self.train_start.tensor(),
                "data.stream.flags": torch.tensor(flags), "rng.data": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["rng.data"])
        if not self.dist.main:
            return
        self.buffer = list(state["data.stream.buffer"].long())
        self.train_start = Position.of(state["data.stream.train_start"])
        exhausted, self.epoch = (int(x) for x in state["data.stream.flags"].tolist())
        pos = Position.of(state["data.stream.pos"])
        print(f"stream: resuming at corpus {pos.corpus}, {'byte' if self.corpora[pos.corpus].path else 'row'} "
              f"{pos.unit}, token {pos.skip} of it, with {len(self.buffer)} blocks in the shuffle buffer",
              file=sys.stderr, flush=True)
        self._start(pos)  # nothing before it is read (a file) or tokenised (a dataset's rows are skipped) again
        if exhausted:
            self.close()
            self.exhausted = True

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
            self.producer = None
