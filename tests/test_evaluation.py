"""Token-task prediction is placed per word (issue 14, defect 1), and long inputs are cut with a warning (defect 2)."""

import warnings

import pytest
import torch

from xlpeft.data.tasks import NO_SUBWORD, PairExample, TokenExample, encode_tokens
from xlpeft.evaluation import encode, predict, score
from xlpeft.packs import load_task_pack

# Words that tokenise to nothing on one tokenizer or the other: format characters strip away under
# BERT's normaliser; an empty string yields no piece under the Unigram/Metaspace one.
EMPTY_CANDIDATES = ("\u200b", "\u200d", "\u200f", "\u00ad", "\ufeff", "\u2066", "")


def empty_word(tokenizer) -> str:
    for w in EMPTY_CANDIDATES:
        if not tokenizer([[w]], is_split_into_words=True, add_special_tokens=False)["input_ids"][0]:
            return w
    pytest.fail("no candidate word tokenises to nothing on this tokenizer")


def oracle(pack, tokenizer, examples, max_len=128):
    """A logits_fn that emits the gold tag at every labelled (first sub-word) position, batch by batch."""
    enc = encode_tokens(tokenizer, examples, {t: i for i, t in enumerate(pack.labels)}, max_len)
    gold = {tuple(ids): labels for ids, labels in zip(enc.input_ids, enc.labels, strict=True)}  # rows in any order

    def logits_fn(batch):
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
        labels = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)
        for j, row in enumerate(rows):
            labels[j, : len(row)] = torch.tensor(gold[row])
        return torch.nn.functional.one_hot(labels.clamp(min=0), len(pack.labels)).float()  # (B, T, L)

    return logits_fn


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_word_without_subwords_keeps_later_words_in_place(base, where):
    pack = load_task_pack("ner")
    gap = empty_word(base.tokenizer)
    words, tags = ["Amina", "alitembelea", "Nairobi", "jana"], ["B-PER", "O", "B-LOC", "O"]
    at = {"start": 0, "middle": 1, "end": 4}[where]
    words.insert(at, gap)
    tags.insert(at, "O")
    examples = [TokenExample(tuple(words), tuple(tags)), TokenExample(("Juma", "Dodoma"), ("B-PER", "B-LOC"))]
    preds = predict(oracle(pack, base.tokenizer, examples), pack, base.tokenizer, examples)
    assert [len(p) for p in preds] == [len(e.tokens) for e in examples]
    assert preds[0] == tags  # the empty word gets "O" at its own position; nothing after it moves
    assert score(pack, examples, preds)["f1"] == 1.0


def test_a_word_without_subwords_is_scored_as_the_default_label(base):
    pack = load_task_pack("ner")
    gap = empty_word(base.tokenizer)
    ex = [TokenExample(("Amina", gap, "Nairobi"), ("B-PER", "B-LOC", "B-LOC"))]
    assert predict(oracle(pack, base.tokenizer, ex), pack, base.tokenizer, ex)[0] == ["B-PER", "O", "B-LOC"]


def test_training_labels_follow_word_ids(base):
    """encode_tokens: each word's label sits at its own first sub-word; an empty word has none."""
    gap = empty_word(base.tokenizer)
    label2id = {"O": 0, "B-PER": 1, "B-LOC": 2}
    ex = [TokenExample((gap, "Amina", gap, "Nairobi", gap), ("O", "B-PER", "O", "B-LOC", "O"))]
    enc = encode_tokens(base.tokenizer, ex, label2id, 64)
    assert enc.words[0][0] == enc.words[0][2] == enc.words[0][4] == NO_SUBWORD
    assert [enc.labels[0][p] for p in (enc.words[0][1], enc.words[0][3])] == [1, 2]
    assert sorted(x for x in enc.labels[0] if x != -100) == [1, 2]


def test_long_sentences_are_cut_counted_and_scored_as_default(base):
    pack = load_task_pack("ner")
    long = TokenExample(tuple(["Amina"] + ["jana"] * 40 + ["Nairobi"]), tuple(["B-PER"] + ["O"] * 40 + ["B-LOC"]))
    short = TokenExample(("Juma", "Dodoma"), ("B-PER", "B-LOC"))
    with pytest.warns(UserWarning, match=r"1 of 2 example\(s\) are longer than max_seq_len=16.*scored as 'O'"):
        enc = encode(pack, base.tokenizer, [long, short], 16)
    assert enc.truncated == 1 and enc.words_cut > 0
    assert all(len(ids) <= 16 for ids in enc.input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preds = predict(oracle(pack, base.tokenizer, [long, short], 16), pack, base.tokenizer, [long, short],
                        max_len=16)
    assert len(preds[0]) == len(long.tokens) and preds[0][-1] == "O"  # cut: no prediction, the default label
    assert preds[0][0] == "B-PER" and preds[1] == ["B-PER", "B-LOC"]


def test_short_inputs_do_not_warn(base):
    pack = load_task_pack("ner")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc = encode(pack, base.tokenizer, [TokenExample(("Juma",), ("B-PER",))], 16)
    assert enc.truncated == 0


def test_long_pairs_are_counted(base):
    from xlpeft.data.tasks import encode_pairs

    ex = [PairExample("watu wote " * 30, "haki", "entailment"), PairExample("a", "b", "neutral")]
    enc = encode_pairs(base.tokenizer, ex, {"entailment": 0, "neutral": 1}, 16)
    assert enc.truncated == 1 and all(len(ids) <= 16 for ids in enc.input_ids)


def test_an_eval_set_is_encoded_once_and_scored_under_many_models(base):
    """eval_set: every example once, batches in length order; predict_set reuses it unchanged, as predict would."""
    from xlpeft.evaluation import eval_set, predict_set

    pack = load_task_pack("ner")
    examples = [TokenExample(tuple(["Amina"] + ["jana"] * n), tuple(["B-PER"] + ["O"] * n)) for n in (9, 1, 5, 3, 7)]
    data = eval_set(pack, base.tokenizer, examples, batch_size=2)
    assert sorted(i for idx, _ in data.batches for i in idx) == list(range(len(examples)))
    widths = [inputs["input_ids"].shape[1] for _, inputs in data.batches]
    assert widths == sorted(widths) and "labels" not in data.batches[0][1]
    right = oracle(pack, base.tokenizer, examples)
    wrong = lambda b: right(b).flip(-1)  # noqa: E731  another "model"
    for fn in (right, wrong, right):
        assert predict_set(fn, data) == predict(fn, pack, base.tokenizer, examples, batch_size=2)
    assert predict_set(right, data) == [list(e.tags) for e in examples]
