"""The on-disk token store: the blocks pack_blocks gives, keyed correctly, never read when broken, built once."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import EN_WORDS, SW_WORDS, make_lines
from xlpeft.data import token_build
from xlpeft.data.corpora import CorpusSpec, iter_lines
from xlpeft.data.mlm import pack_blocks, split_blocks
from xlpeft.data.token_store import Blocks, open_store, store_key
from xlpeft.errors import XlpeftError


def _awkward_corpus(path: Path) -> Path:
    """CRLF and lone-CR line ends, blank and space-only lines, a 27k-character line, non-ASCII text."""
    text = ("\r\n".join(make_lines(SW_WORDS, 600, seed=3)) + "\n\n  \n" + "watu\rhaki\n" + "kila mtu " * 3000
            + "\nñandutí ẓ ǂ 語 \n" + "\n".join(make_lines(EN_WORDS, 600, seed=4)) + "\n")
    path.write_text(text, encoding="utf-8")
    return path


def _store(corpus: Path, tokenizer, root: Path, **kw):
    return open_store([CorpusSpec(path=str(corpus))], tokenizer, kw.pop("limit", 0), root=root, progress=False, **kw)


def _all(blocks: Blocks) -> torch.Tensor:
    return blocks[torch.arange(len(blocks))]


@pytest.mark.parametrize("workers", [1, 3])
def test_store_blocks_equal_pack_blocks(base, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(token_build, "RANGE_BYTES", 2048)  # many ranges, cut inside the long line too
    corpus = _awkward_corpus(tmp_path / "c.txt")
    store = _store(corpus, base.tokenizer, tmp_path / "tokens", workers=workers)
    assert store.meta["workers"] == workers
    for length in (8, 32, 130):
        ref = pack_blocks(base.tokenizer, iter_lines(CorpusSpec(path=str(corpus))), length, progress=False)
        assert torch.equal(_all(store.blocks(length, base.tokenizer)), ref), length


def test_a_lone_partial_block_is_padded_as_pack_blocks_does(base, tmp_path):
    corpus = tmp_path / "one.txt"
    corpus.write_text("watu wote\n", encoding="utf-8")
    blocks = _store(corpus, base.tokenizer, tmp_path / "tokens").blocks(64, base.tokenizer)
    assert len(blocks) == 1
    assert torch.equal(_all(blocks), pack_blocks(base.tokenizer, ["watu wote"], 64, progress=False))


def test_indexing_and_split_match_a_tensor(base, tmp_path):
    corpus = _awkward_corpus(tmp_path / "c.txt")
    blocks = _store(corpus, base.tokenizer, tmp_path / "tokens").blocks(16, base.tokenizer)
    dense = _all(blocks)
    assert torch.equal(blocks[3:9], dense[3:9]) and torch.equal(blocks[5], dense[5])
    assert torch.equal(blocks[[7, 2, 7]], dense[[7, 2, 7]])
    view_train, view_eval = split_blocks(blocks, 0.1, seed=4)
    train, held = split_blocks(dense, 0.1, seed=4)
    assert isinstance(view_train, Blocks) and view_train.shape == train.shape
    assert torch.equal(_all(view_train), train) and torch.equal(_all(view_eval), held)
    assert torch.equal(view_train[torch.tensor([4, 0])], train[[4, 0]])


def test_cache_hits_and_misses_are_keyed_on_content_tokenizer_and_limit(base_dirs, tmp_path):
    from xlpeft.models import load_base

    bert, xlmr = (load_base(str(base_dirs[k])).tokenizer for k in ("tiny-bert", "tiny-xlmr"))
    corpus, root = _awkward_corpus(tmp_path / "c.txt"), tmp_path / "tokens"
    first = _store(corpus, bert, root)
    again = _store(corpus, bert, root)
    assert not first.hit and again.hit and again.path == first.path
    assert not _store(corpus, xlmr, root).hit, "another tokenizer is another store"
    assert not _store(corpus, bert, root, limit=5).hit and _store(corpus, bert, root, limit=5).meta["n_lines"] == 5
    corpus.write_text(corpus.read_text(encoding="utf-8").replace("watu", "wat", 1), encoding="utf-8")
    changed = _store(corpus, bert, root)
    assert not changed.hit and changed.path != first.path, "a rewritten file is another store"
    # max_seq_len is not part of the key: the store holds the stream, and each length cuts its own blocks
    for length in (12, 40):
        ref = pack_blocks(bert, iter_lines(CorpusSpec(path=str(corpus))), length, progress=False)
        assert torch.equal(_all(_store(corpus, bert, root).blocks(length, bert)), ref)


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta", "no-meta", "half-written"])
def test_a_broken_store_is_rebuilt_never_read(base, tmp_path, capsys, damage):
    corpus, root = _awkward_corpus(tmp_path / "c.txt"), tmp_path / "tokens"
    good = _store(corpus, base.tokenizer, root)
    expected = np.array(good.tokens)
    data, meta = good.path / "tokens.bin", good.path / "meta.json"
    del good
    if damage == "flip":  # one token changed, the size unchanged
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-2])
    elif damage == "meta":
        meta.write_text("{not json")
    elif damage == "no-meta":
        meta.unlink()
    else:  # a builder killed mid-way: its temporary folder is left, the store was never published
        shutil.move(str(data.parent), str(root / (data.parent.name + ".tmp-999")))
    capsys.readouterr()
    rebuilt = _store(corpus, base.tokenizer, root)
    assert not rebuilt.hit and np.array_equal(np.array(rebuilt.tokens), expected)
    if damage != "half-written":
        assert "incomplete or corrupted; rebuilding" in capsys.readouterr().err
    assert _store(corpus, base.tokenizer, root).hit


def _build_in_child(args: tuple) -> tuple[bool, str]:
    corpus, root, base_dir = args
    from xlpeft.models import load_base

    store = _store(Path(corpus), load_base(base_dir).tokenizer, Path(root))
    return store.hit, store.meta["checksum"]


def test_concurrent_builders_build_once(base_dirs, tmp_path):
    corpus, root = _awkward_corpus(tmp_path / "c.txt"), tmp_path / "tokens"
    args = (str(corpus), str(root), str(base_dirs["tiny-bert"]))
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_build_in_child, [args] * 3)
    assert sorted(hit for hit, _ in results) == [False, True, True], "one builder, two readers"
    assert len({digest for _, digest in results}) == 1
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == [store_key(
        [CorpusSpec(path=str(corpus))], _tok(base_dirs), 0)], "no temporary folder is left behind"


def _tok(base_dirs):
    from xlpeft.models import load_base

    return load_base(str(base_dirs["tiny-bert"])).tokenizer


def test_an_empty_stream_is_refused(base, tmp_path):
    with pytest.raises(XlpeftError, match="no tokens"):
        Blocks(np.zeros(0, np.uint16), 16, 1, 2, 0)
    with pytest.raises(XlpeftError, match="room for"):
        Blocks(np.ones(10, np.uint16), 2, 1, 2, 0)


def test_worker_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("XLPEFT_TOKENIZE_WORKERS", "many")
    with pytest.raises(XlpeftError, match="positive integer"):
        token_build._workers(None, 1, 4)
    monkeypatch.setenv("XLPEFT_TOKENIZE_WORKERS", "8")
    assert token_build._workers(None, 1, 3) == 3, "never more workers than ranges"
    monkeypatch.delenv("XLPEFT_TOKENIZE_WORKERS")
    assert token_build._workers(None, 1, 3) == 1, "a small corpus is tokenised in-process"


def test_meta_records_what_built_it(base, tmp_path):
    store = _store(_awkward_corpus(tmp_path / "c.txt"), base.tokenizer, tmp_path / "tokens")
    meta = json.loads((store.path / "meta.json").read_text())
    assert meta["n_tokens"] == len(store.tokens) and meta["dtype"] == "uint16" and meta["format"] == 1
    assert meta["corpora"] == [str(tmp_path / "c.txt")] and meta["limit"] == 0
