import pytest
import torch

from xlpeft.data.batches import batches
from xlpeft.data.corpora import CorpusSpec, check_text_file, iter_lines, parse_corpus
from xlpeft.data.mlm import mask_tokens, pack_blocks, special_mask, split_blocks
from xlpeft.errors import XlpeftError


def test_blocks_are_full_and_framed(base):
    lines = ["watu wote wamezaliwa huru"] * 50
    blocks = pack_blocks(base.tokenizer, lines, max_seq_len=16, progress=False)
    assert blocks.shape[1] == 16
    assert (blocks[:, 0] == base.tokenizer.cls_token_id).all()
    assert (blocks[:, -1] == base.tokenizer.sep_token_id).all()
    body_tokens = len(base.tokenizer("watu wote wamezaliwa huru", add_special_tokens=False)["input_ids"]) + 1
    assert blocks.shape[0] == (50 * body_tokens) // 14


def test_masking_statistics_and_specials(base):
    ids = pack_blocks(base.tokenizer, ["kila mtu anastahili haki zote uhuru"] * 400, 32, progress=False)
    inputs, labels = mask_tokens(ids, base.tokenizer, 0.15, torch.Generator().manual_seed(0))
    specials = special_mask(base.tokenizer, ids)
    selected = labels != -100
    assert not (selected & specials).any(), "special tokens must never be selected"
    rate = selected.sum() / (~specials).sum()
    assert 0.13 < rate < 0.17
    masked = inputs == base.tokenizer.mask_token_id
    assert 0.75 < (masked & selected).sum() / selected.sum() < 0.85
    unchanged = (inputs == ids) & selected
    assert 0.05 < unchanged.sum() / selected.sum() < 0.15
    assert (labels[selected] == ids[selected]).all()


def test_masking_is_reproducible(base):
    ids = pack_blocks(base.tokenizer, ["haki zao ni sawa"] * 100, 16, progress=False)
    a = mask_tokens(ids, base.tokenizer, 0.15, torch.Generator().manual_seed(7))
    b = mask_tokens(ids, base.tokenizer, 0.15, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_split_holds_out_at_least_one_block():
    blocks = torch.arange(40).view(10, 4)
    train, held = split_blocks(blocks, 0.05, seed=0)
    assert len(held) == 1 and len(train) == 9
    assert set(train[:, 0].tolist()).isdisjoint(held[:, 0].tolist())
    with pytest.raises(XlpeftError, match="at least 2"):
        split_blocks(blocks[:1], 0.05, 0)


def test_batches_cycle_through_epochs():
    blocks = torch.arange(12).view(6, 2)
    it = batches(blocks, 4, torch.Generator().manual_seed(0))
    seen = [next(it) for _ in range(3)]
    assert all(b.shape == (4, 2) for b in seen)


def test_corpus_checks(tmp_path):
    with pytest.raises(XlpeftError, match="does not exist"):
        check_text_file(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(XlpeftError, match="empty"):
        check_text_file(empty)
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\x00\x01\x02abc")
    with pytest.raises(XlpeftError, match="binary"):
        check_text_file(binary)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("ni sawa \xe9t\xe9".encode("latin-1"))
    with pytest.raises(XlpeftError, match="not UTF-8"):
        check_text_file(latin)


def test_iter_lines_skips_blank_and_limits(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("a\n\n b \nc\nd\n", encoding="utf-8")
    assert list(iter_lines(CorpusSpec(path=str(p)))) == ["a", "b", "c", "d"]
    assert list(iter_lines(CorpusSpec(path=str(p)), limit=2)) == ["a", "b"]


def test_parse_corpus_specs():
    assert parse_corpus("hf:wikimedia/wikipedia:20231101.sw") == CorpusSpec(hf="wikimedia/wikipedia", config="20231101.sw")
    assert parse_corpus("hf:cc100:sw:train").split == "train"
    assert parse_corpus("text.txt").path == "text.txt"
    with pytest.raises(XlpeftError, match="hf:NAME"):
        parse_corpus("hf:")


def test_random_replacements_are_never_special(base):
    """Defect 3: ``torch.randint(len(tokenizer))`` could insert PAD/CLS/SEP/MASK as the "random" 10%."""
    tok = base.tokenizer
    ids = pack_blocks(tok, ["kila mtu anastahili haki zote uhuru"] * 2000, 32, progress=False)
    # probability 1.0: every non-special token is selected, so ~10% of them are random replacements
    inputs, labels = mask_tokens(ids, tok, 1.0, torch.Generator().manual_seed(3))
    replaced = (inputs != ids) & (inputs != tok.mask_token_id)
    assert replaced.sum() > 1000  # enough draws that the old code hits a special id (5 of ~200) for sure
    specials = torch.tensor(sorted(set(tok.all_special_ids)))
    assert not torch.isin(inputs[replaced], specials).any()
    assert int(inputs[replaced].max()) < len(tok)


def test_mlm_loss_attention_comes_from_the_clean_batch(base):
    """A replacement that equals PAD must not be masked out of attention: the mask comes from the clean ids."""
    from xlpeft.data.mlm import attention_mask_for
    from xlpeft.training import mlm_loss

    tok = base.tokenizer
    clean = pack_blocks(tok, ["watu wote wamezaliwa huru"] * 20, 16, progress=False)[:2]
    labels = torch.full_like(clean, -100)
    labels[:, 3] = clean[:, 3]
    corrupted = clean.clone()
    corrupted[:, 5] = tok.pad_token_id  # as the old random replacement could do
    base.model.eval()
    with torch.no_grad():
        right = mlm_loss(base, corrupted, labels, attention_mask_for(clean, tok.pad_token_id))
        ones = mlm_loss(base, corrupted, labels, torch.ones_like(clean))
        implied = mlm_loss(base, corrupted, labels)  # None: non-pad of the given ids, the old behaviour
    assert torch.allclose(right, ones)
    assert abs(float(right - implied)) > 1e-6, float(right - implied)


@pytest.mark.parametrize("sets, available, expected", [
    ({"max_steps": 10, "batch_size": 8}, 1000, 32),  # a fifth of 80 blocks is 16: the 4-batch minimum
    ({"max_steps": 1000, "batch_size": 8}, 1000, 400),  # a fifth of 8,000 is 1,600: eval_batches (50 x 8) caps it
    ({"max_steps": 100, "batch_size": 8, "grad_accum": 2}, 1000, 320),  # a fifth of 1,600 blocks
    ({"max_steps": 1000, "batch_size": 8}, 20, 20),  # never more than are held out
    ({"max_steps": 10, "eval_tokens": 2560, "max_seq_len": 256}, 1000, 10),  # an explicit budget in tokens
])
def test_eval_block_count(sets, available, expected):
    from xlpeft.config import TrainConfig
    from xlpeft.training import eval_block_count

    assert eval_block_count(TrainConfig(**sets), available) == expected
