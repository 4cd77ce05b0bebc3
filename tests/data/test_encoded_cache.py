"""The encoded-task-data cache: what encode() gives, keyed on the examples and the tokenizer, re-encoded when damaged."""

from __future__ import annotations

import pytest

from tests.conftest import make_ner
from xlpeft.data.encoded_cache import cached_encoding, encoding_key
from xlpeft.data.tasks import Encoded, PairExample, TokenExample, encode_pairs, encode_tokens

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]


def _token_examples(n=30, seed=0):
    return [TokenExample(tuple(w for w, _ in s), tuple(t for _, t in s)) for s in make_ner(n, seed)]


def _same(a: Encoded, b: Encoded) -> None:
    assert (a.input_ids, a.labels, a.words, a.truncated, a.words_cut) == \
           (b.input_ids, b.labels, b.words, b.truncated, b.words_cut)


@pytest.mark.parametrize("kind", ["tokens", "pairs"])
def test_a_cached_encoding_equals_a_fresh_one(base, tmp_path, kind):
    label2id = {lab: i for i, lab in enumerate(LABELS)}
    if kind == "tokens":
        examples = _token_examples()
        fresh = encode_tokens(base.tokenizer, examples, label2id, 8)  # short: some examples are cut
        assert fresh.truncated and fresh.words_cut
    else:
        examples = [PairExample("Juma works in Nairobi today", h, lab) for h, lab in
                    [("Juma works", "O"), ("nobody", "B-PER"), ("", "B-LOC")]] * 4
        fresh = encode_pairs(base.tokenizer, examples, label2id, 7)
    key = encoding_key(examples, base.tokenizer, LABELS, kind, 8)
    first, hit = cached_encoding(key, lambda: fresh, tmp_path)
    assert not hit and first is fresh
    again, hit = cached_encoding(key, lambda: pytest.fail("a hit must not encode"), tmp_path)
    assert hit
    _same(again, fresh)


def test_the_key_follows_examples_tokenizer_labels_and_length(base_dirs):
    from xlpeft.models import load_base

    bert, xlmr = (load_base(str(base_dirs[k])).tokenizer for k in ("tiny-bert", "tiny-xlmr"))
    ex = _token_examples()
    key = encoding_key(ex, bert, LABELS, "token_classification", 128)
    assert key == encoding_key(list(ex), bert, LABELS, "token_classification", 128)
    others = [encoding_key(ex[:-1], bert, LABELS, "token_classification", 128),
              encoding_key(ex, xlmr, LABELS, "token_classification", 128),
              encoding_key(ex, bert, LABELS[::-1], "token_classification", 128),
              encoding_key(ex, bert, LABELS, "token_classification", 64),
              encoding_key([TokenExample(ex[0].tokens, ("O",) * len(ex[0].tokens)), *ex[1:]], bert, LABELS,
                           "token_classification", 128)]
    assert key not in others and len(set(others)) == len(others)


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 not a zip", "truncate"])
def test_a_damaged_entry_is_encoded_again(base, tmp_path, damage):
    label2id = {lab: i for i, lab in enumerate(LABELS)}
    examples = _token_examples()
    fresh = encode_tokens(base.tokenizer, examples, label2id, 32)
    key = encoding_key(examples, base.tokenizer, LABELS, "token_classification", 32)
    cached_encoding(key, lambda: fresh, tmp_path)
    path = tmp_path / f"{key}.npz"
    path.write_bytes(path.read_bytes()[:200] if damage == "truncate" else damage)
    calls = []
    again, hit = cached_encoding(key, lambda: calls.append(1) or fresh, tmp_path)
    assert not hit and calls == [1]
    _same(cached_encoding(key, lambda: pytest.fail("repaired"), tmp_path)[0], fresh)
