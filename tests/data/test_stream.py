"""Streamed MLM blocks: pack_blocks's blocks in order, resumable at every block, a fixed held-out set, hf: rows too."""

from __future__ import annotations

import json

import pytest
import torch

from tests.data.test_token_store import _awkward_corpus
from xlpeft.data import stream
from xlpeft.data.corpora import CorpusSpec, iter_lines, parse_corpus
from xlpeft.data.mlm import pack_blocks
from xlpeft.data.stream import Position, StreamBatches, check_streamable, corpus_mode, stream_blocks
from xlpeft.distributed import Dist
from xlpeft.errors import XlpeftError


def _reference(specs, tokenizer, length):
    return pack_blocks(tokenizer, (line for s in specs for line in iter_lines(s)), length, progress=False)


@pytest.fixture
def hf_dir(tmp_path):
    """A local dataset folder (JSON lines) that ``datasets`` streams offline, as it would a hub dataset."""
    folder = tmp_path / "hfds"
    folder.mkdir()
    rows = [{"text": f"watu wote wamezaliwa huru {i}\nhaki zao ni sawa {i % 7}", "n": i} for i in range(120)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return folder


def test_streamed_blocks_are_pack_blocks_blocks_across_corpora(base, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "UNITS_PER_CALL", 5)
    f = _awkward_corpus(tmp_path / "c.txt")
    specs = [CorpusSpec(path=str(f)), CorpusSpec(path=str(f))]
    got = torch.stack([b for b, _ in stream_blocks(specs, base.tokenizer, 24)])
    assert torch.equal(got, _reference(specs, base.tokenizer, 24))


def test_the_stream_restarts_exactly_at_every_position(base, tmp_path, hf_dir):
    f = _awkward_corpus(tmp_path / "c.txt")
    specs = [parse_corpus(f"hf:{hf_dir}"), CorpusSpec(path=str(f))]
    items = list(stream_blocks(specs, base.tokenizer, 16))
    blocks = torch.stack([b for b, _ in items])
    assert torch.equal(blocks, _reference(specs, base.tokenizer, 16)), "an hf: corpus streams its rows' lines"
    crossing = next(k for k, (_, p) in enumerate(items) if p.corpus == 1)
    for k in (0, 3, crossing - 1, crossing, len(items) // 2, len(items) - 2):
        rest = torch.stack([b for b, _ in stream_blocks(specs, base.tokenizer, 16, items[k][1])])
        assert torch.equal(rest, blocks[k + 1:]), k


def test_a_long_line_is_read_in_pieces_cut_at_spaces(base, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "UNIT_BYTES", 64)
    path = tmp_path / "long.txt"
    path.write_text(("kila mtu ñandutí " * 40) + "\n" + "语" * 100 + "\nhaki\n", encoding="utf-8")
    units = list(stream._file_units(path, 0))
    assert all(len(text.encode()) <= 64 for _, text, _ in units) and units[0][2] == units[1][0]
    assert "".join(text for _, text, _ in units) == path.read_text(encoding="utf-8"), "pieces cover the file exactly"
    assert all(text.endswith((" ", "\n")) for _, text, _ in units[:5]), "cut after a space"


def _batches(specs, tokenizer, seed=0, n_eval=6, buffer=20):
    return StreamBatches(specs, tokenizer, 16, 4, torch.Generator().manual_seed(seed), n_eval, buffer, Dist())


def test_held_out_blocks_are_the_first_and_never_trained_on(base, tmp_path):
    specs = [CorpusSpec(path=str(_awkward_corpus(tmp_path / "c.txt")))]
    ref = _reference(specs, base.tokenizer, 16)
    data = _batches(specs, base.tokenizer)
    try:
        assert torch.equal(data.eval_blocks, ref[:6])
        seen = torch.cat([next(data) for _ in range(50)])
        assert not any(torch.equal(row, e) for row in seen for e in ref[:6] if not torch.equal(e, ref[6]))
    finally:
        data.close()


def test_resume_gives_the_same_batches_across_epochs(base, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("\n".join(f"watu wote wamezaliwa huru {i}" for i in range(60)) + "\n", encoding="utf-8")
    specs = [CorpusSpec(path=str(path))]
    n_train = len(_reference(specs, base.tokenizer, 16)) - 6
    one = _batches(specs, base.tokenizer)
    two = _batches(specs, base.tokenizer, seed=99)
    try:
        for _ in range(3):
            next(one)
        state = one.state_dict()
        rest = [next(one) for _ in range(3 * n_train // 4)]  # three passes over the training blocks
        assert one.epoch >= 2
        two.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(rest, [next(two) for _ in range(len(rest))], strict=True))
    finally:
        one.close()
        two.close()


def test_a_corpus_too_small_to_hold_out_and_train_is_refused(base, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("watu wote\n", encoding="utf-8")
    with pytest.raises(XlpeftError, match="corpus_mode=cache"):
        _batches([CorpusSpec(path=str(path))], base.tokenizer)


def test_reader_errors_reach_the_training_loop(base, hf_dir):
    spec = CorpusSpec(hf=str(hf_dir), text_field="body")
    with pytest.raises(XlpeftError, match="no field 'body'"):
        _batches([spec], base.tokenizer)


def test_mode_choice_and_epoch_phases():
    from xlpeft.config import TrainConfig
    from xlpeft.methods.sft.config import SFTConfig

    files, hub = [CorpusSpec(path="a.txt")], [CorpusSpec(path="a.txt"), CorpusSpec(hf="cc100")]
    assert corpus_mode(TrainConfig(), files) == "cache" and corpus_mode(TrainConfig(), hub) == "stream"
    assert corpus_mode(TrainConfig(corpus_mode="stream"), files) == "stream"
    assert corpus_mode(TrainConfig(corpus_mode="cache"), hub) == "cache"
    check_streamable(SFTConfig())
    with pytest.raises(XlpeftError, match="full_epochs.*full_steps=N"):
        check_streamable(SFTConfig(full_epochs=3))
    with pytest.raises(XlpeftError, match="max_corpus_lines=5 limits a cached corpus"):
        check_streamable(SFTConfig(), TrainConfig(max_corpus_lines=5))
    assert Position.of(Position(1, 2, 3).tensor()) == Position(1, 2, 3)
