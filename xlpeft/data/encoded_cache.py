"""Encoded task data cached on disk, so a 100k-sentence training set is tokenised once, not on every run and resume.

The key is the examples themselves (words and tags, or premise, hypothesis and label), the
tokenizer's fingerprint, the label order, the head and ``max_len``: whatever file, split or
``hf:`` dataset they came from, the same examples encode the same way. Entries live in
``$XLPEFT_CACHE/encoded/<key>.npz`` as flat int32 arrays with offsets, written to a temporary
name and renamed, and are checked on reading (a damaged entry is encoded again, never used).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xlpeft.data.tasks import Encoded, PairExample, TokenExample
from xlpeft.data.token_store import tokenizer_fingerprint

FORMAT = 1


def encoding_key(examples: list, tokenizer, labels: list[str], head: str, max_len: int) -> str:
    """24 hex digits naming this encoding of ``examples``."""
    h = hashlib.sha256(json.dumps([FORMAT, tokenizer_fingerprint(tokenizer), list(labels), head, max_len]).encode())
    for e in examples:
        row = ([list(e.tokens), list(e.tags)] if isinstance(e, TokenExample) else
               [e.premise, e.hypothesis, e.label] if isinstance(e, PairExample) else repr(e))
        h.update(json.dumps(row, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:24]


def cached_encoding(key: str, compute: Callable[[], Encoded], root: Path | None = None) -> tuple[Encoded, bool]:
    """(the encoding under ``key``, whether it came from the cache); computed and stored when absent or damaged."""
    if root is None:
        from xlpeft.models import cache_dir

        root = cache_dir() / "encoded"
    path = Path(root) / f"{key}.npz"
    found = _read(path)
    if found is not None:
        print(f"encoded training data: from the cache ({len(found.input_ids):,} examples, {path})", file=sys.stderr,
              flush=True)
        return found, True
    enc = compute()
    try:  # a read-only cache only costs the encoding next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{key}.tmp-{os.getpid()}.npz")
        np.savez(tmp, **_arrays(enc))
        tmp.replace(path)
    except OSError:
        pass
    return enc, False


def _flat(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (N+1,)
    flat = np.fromiter((x for r in rows for x in r), dtype=np.int32, count=int(offsets[-1]))  # (sum of lengths,)
    return flat, offsets


def _arrays(enc: Encoded) -> dict[str, np.ndarray]:
    ids, id_off = _flat(enc.input_ids)
    out = {"ids": ids, "id_off": id_off, "counts": np.array([enc.truncated, enc.words_cut, FORMAT], dtype=np.int64)}
    if enc.labels and isinstance(enc.labels[0], list):
        out["labels"], out["label_off"] = _flat(enc.labels)
    else:
        out["labels"] = np.asarray(enc.labels, dtype=np.int32)
    out["words"], out["word_off"] = _flat(enc.words) if enc.words else (np.zeros(0, np.int32), np.zeros(1, np.int64))
    return out


def _rows(flat: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    values = flat.tolist()
    return [values[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]


def _read(path: Path) -> Encoded | None:
    """The encoding stored at ``path``, or None when it is absent, of another format or inconsistent."""
    try:
        with np.load(path) as z:
            a = {k: z[k] for k in z.files}
        truncated, words_cut, fmt = (int(x) for x in a["counts"])
        n = len(a["id_off"]) - 1
        if fmt != FORMAT or a["id_off"][-1] != len(a["ids"]) or (a["id_off"][1:] < a["id_off"][:-1]).any():
            return None
        if "label_off" in a:
            if len(a["label_off"]) - 1 != n or a["label_off"][-1] != len(a["labels"]):
                return None
            labels = _rows(a["labels"], a["label_off"])
        else:
            if len(a["labels"]) != n:
                return None
            labels = a["labels"].tolist()
        words = _rows(a["words"], a["word_off"]) if len(a["word_off"]) > 1 else []
        if words and len(words) != n:
            return None
        return Encoded(_rows(a["ids"], a["id_off"]), labels, words, truncated, words_cut)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
