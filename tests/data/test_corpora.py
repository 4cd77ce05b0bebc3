"""The streaming corpus validator: first bad byte by offset and line, chunk boundaries, the memo of a passed file."""

from __future__ import annotations

import pytest

from xlpeft.data import corpora
from xlpeft.data.corpora import CorpusSpec, check_text_file, fingerprint_corpora
from xlpeft.errors import XlpeftError


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(corpora, "SCAN_CHUNK", 7)  # multi-byte characters straddle every chunk boundary


def test_valid_multibyte_text_passes_across_chunk_boundaries(tmp_path, tiny_chunks):
    path = tmp_path / "ok.txt"
    text = "ñandutí 語 ǂʼ 🙂 wote\n" * 50
    path.write_text(text, encoding="utf-8")
    import hashlib

    assert check_text_file(path) == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("bad", [b"\xff", b"\xe2\x82", b"\xc3(", b"\x80"])
def test_the_first_bad_byte_is_named_by_offset_and_line(tmp_path, tiny_chunks, bad):
    head = "watu wote\nñandutí 語\nhaki ".encode()
    path = tmp_path / "bad.txt"
    path.write_bytes(head + bad + b" zao\nmore \xff\n")
    with pytest.raises(XlpeftError, match=rf"not UTF-8 \(byte {len(head)}, line 3:"):
        check_text_file(path)


def test_a_truncated_sequence_at_the_end_is_reported(tmp_path, tiny_chunks):
    path = tmp_path / "cut.txt"
    path.write_bytes("watu wote\nlast 語".encode()[:-1])
    with pytest.raises(XlpeftError, match="byte 15, line 2"):
        check_text_file(path)


def test_nul_bytes_anywhere_are_binary(tmp_path):
    path = tmp_path / "late.txt"
    path.write_bytes(b"watu wote\n" * 10_000 + b"ab\x00c\n")  # far past the first 64 KiB
    with pytest.raises(XlpeftError, match="NUL byte at byte 100002, line 10001"):
        check_text_file(path)


def test_a_passed_file_is_not_read_again_until_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text("watu wote\n" * 100, encoding="utf-8")
    first = check_text_file(path)
    scans = []
    real = corpora._scan
    monkeypatch.setattr(corpora, "_scan", lambda p: scans.append(p) or real(p))
    assert check_text_file(path) == first and scans == [], "the memo answers"
    fp = fingerprint_corpora([CorpusSpec(path=str(path))])
    path.write_text("watu wote\n" * 99 + "haki zote\n", encoding="utf-8")  # rewritten: same size, new content
    assert check_text_file(path) != first and len(scans) == 1
    assert fingerprint_corpora([CorpusSpec(path=str(path))]) != fp
    path.write_bytes(b"\xff" * 1000)
    with pytest.raises(XlpeftError, match="not UTF-8"):
        check_text_file(path)


def test_a_read_only_cache_only_costs_the_scan(tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("XLPEFT_CACHE", str(blocker))
    path = tmp_path / "c.txt"
    path.write_text("watu wote\n", encoding="utf-8")
    assert check_text_file(path) == check_text_file(path)
