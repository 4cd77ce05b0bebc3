"""New sub-word pieces (``--set new_token_unit=piece``): vocabulary for scripts written without spaces.

Whole-word tokens serve a language whose words are separated by spaces. Khmer, Thai, Lao, Burmese
or Japanese put spaces between phrases, so a "word" is a whole clause and few repeat. For them the
language module adds *pieces*: a sub-word model of the base's own kind (Unigram for XLM-R,
WordPiece for mBERT) is trained on the target text with the base's normaliser and pre-tokeniser,
and its most frequent pieces that the base vocabulary lacks (and splits into two or more of its
own pieces) join the base model's vocabulary after its ids, as in Wang et al. (2020, "Extending
Multilingual BERT to Low-Resource Languages") and the new-script sub-words of Pfeiffer et al.
(2021, "UNKs Everywhere"). The base's own algorithm then uses them inside words: WordPiece's
longest match takes them wherever they are the longest piece; in a Unigram model a new piece
scores ``MARGIN`` above the base's best reading of the same characters, so it is chosen at least
wherever that reading would have been. Each new row starts as the mean of the base pieces it
replaces (:func:`base_ids`).
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from xlpeft.errors import XlpeftError

MARGIN = 1.0  # a new Unigram piece's log-probability above the base's best segmentation of its characters
UNK_PENALTY = 10.0  # the Unigram model's own score for an unknown character: the lowest piece score minus 10
KINDS = ("Unigram", "WordPiece")


def _backend(tokenizer) -> dict:
    """The base tokenizer's serialised pipeline; a model other than Unigram or WordPiece is refused."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = None if backend is None else json.loads(backend.to_str())
    kind = None if data is None else data["model"]["type"]
    if kind not in KINDS:
        raise XlpeftError(f"new_token_unit=piece extends a Unigram (XLM-R) or WordPiece (mBERT) tokenizer; this base's "
                          f"is {kind or 'a slow (Python) tokenizer'}; use --set new_token_unit=word")
    return data


def _unigram_scores(model: dict) -> tuple[dict[str, float], float]:
    """Piece -> log-probability of a Unigram model, and the score it gives an unknown character."""
    scores = {piece: float(score) for piece, score in model["vocab"]}
    return scores, min(scores.values()) - UNK_PENALTY


def _wordpiece_ids(token: str, vocab: dict[str, int], prefix: str, unk: int) -> list[int]:
    """WordPiece's greedy longest match of ``token`` (a continuation piece when it starts with ``prefix``)."""
    inner = token.startswith(prefix)
    body, ids, start = token[len(prefix):] if inner else token, [], 0
    while start < len(body):
        for end in range(len(body), start, -1):
            piece = body[start:end] if (start == 0 and not inner) else prefix + body[start:end]
            if piece in vocab:
                ids.append(vocab[piece])
                start = end
                break
        else:
            return [unk]  # as WordPiece: a word it cannot cover is one unknown token
    return ids


def base_reader(tokenizer) -> Callable[[str], list[int]]:
    """piece -> the base pieces it is read as without it (a piece string as the model stores it, "▁ab" or "##ab").

    The tokenizer is serialised once (an XLM-R vocabulary is 17 MB of JSON), not per piece.
    """
    model = _backend(tokenizer)["model"]
    if model["type"] == "Unigram":
        backend = tokenizer.backend_tokenizer.model
        return lambda token: [backend.token_to_id(t.value) for t in backend.tokenize(token)]
    prefix, vocab = model.get("continuing_subword_prefix") or "##", model["vocab"]
    return lambda token: _wordpiece_ids(token, vocab, prefix, vocab[model["unk_token"]])


def base_ids(tokenizer, token: str) -> list[int]:
    """The base pieces ``token`` is read as without it (:func:`base_reader`, for one piece)."""
    return base_reader(tokenizer)(token)


def _trained_segmenter(lines: list[str], tokenizer, data: dict, size: int, min_count: int):
    """A sub-word model of the base's kind trained on ``lines``, with the base's normaliser and pre-tokeniser.

    WordPiece merges only pairs seen ``min_count``+ times: on a small text it would otherwise merge
    on into whole (rare) words; a Unigram model prunes its pieces by likelihood itself.
    """
    from tokenizers import Tokenizer, models, trainers

    backend, unk = tokenizer.backend_tokenizer, data["model"].get("unk_token") or tokenizer.unk_token
    if data["model"]["type"] == "Unigram":
        segmenter = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=size, show_progress=False, max_piece_length=16,
                                          unk_token=tokenizer.unk_token, special_tokens=[tokenizer.unk_token])
    else:
        prefix = data["model"].get("continuing_subword_prefix") or "##"
        segmenter = Tokenizer(models.WordPiece(unk_token=unk, continuing_subword_prefix=prefix))
        trainer = trainers.WordPieceTrainer(vocab_size=size, min_frequency=min_count, show_progress=False,
                                            special_tokens=[unk], continuing_subword_prefix=prefix)
    segmenter.normalizer, segmenter.pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    segmenter.train_from_iterator(lines, trainer)
    return segmenter


def select_pieces(lines: Iterable[str], tokenizer, n: int, min_count: int = 3,
                  max_lines: int = 200_000) -> tuple[list[str], list[float]]:
    """The ``n`` most frequent pieces of a sub-word model trained on ``lines`` that the base lacks and splits.

    Frequency is counted in the trained model's segmentation of the same lines; ties go to the piece
    seen first, so the choice is deterministic. Returns the pieces and, for a Unigram base, the
    scores they enter its model with (empty for WordPiece, which has none).
    """
    data = _backend(tokenizer)
    text = [line for line in itertools.islice(lines, max_lines) if line.strip()]
    if not text:
        return [], []
    segmenter = _trained_segmenter(text, tokenizer, data, max(8 * n, 1000), min_count)
    counts: Counter[str] = Counter()
    for encoding in segmenter.encode_batch(text):
        counts.update(encoding.tokens)
    known, unk, read = tokenizer.get_vocab(), tokenizer.unk_token, base_reader(tokenizer)
    chosen = []
    for piece, count in counts.most_common():
        if count < min_count or len(chosen) == n:
            break
        if piece != unk and piece not in known and len(read(piece)) >= 2:
            chosen.append(piece)
    if data["model"]["type"] != "Unigram":
        return chosen, []
    scores, unk_score = _unigram_scores(data["model"])
    model = tokenizer.backend_tokenizer.model
    unk_id = model.token_to_id(unk)

    def reading(piece: str) -> float:  # the base's best segmentation's log-probability
        return sum(unk_score if t.id == unk_id else scores[t.value] for t in model.tokenize(piece))

    return chosen, [reading(p) + MARGIN for p in chosen]


def with_pieces(tokenizer, pieces: tuple[str, ...], scores: tuple[float, ...], first_id: int):
    """A new tokenizer whose model also holds ``pieces`` at ids ``first_id``...; ``tokenizer`` is unchanged.

    Written to and read back from a temporary directory with transformers' own loader, so the copy
    is exactly what ``save_pretrained`` of it reloads as (``compose --output`` saves it that way).
    """
    from transformers import AutoTokenizer

    data = _backend(tokenizer)
    model = data["model"]
    held = len(model["vocab"]) if model["type"] == "Unigram" else max(model["vocab"].values()) + 1
    if held != first_id or len(tokenizer) != first_id:
        raise XlpeftError(f"the module's new pieces start at id {first_id}, but this tokenizer's model holds {held} "
                          f"pieces ({len(tokenizer)} tokens in all): it was trained with another tokenizer, or this "
                          "one keeps added tokens after its model's (use the module's own base, or new_token_unit=word)")
    if model["type"] == "Unigram":
        model["vocab"].extend([piece, score] for piece, score in zip(pieces, scores, strict=True))
    else:
        model["vocab"].update({piece: first_id + i for i, piece in enumerate(pieces)})
    with tempfile.TemporaryDirectory(prefix="xlpeft-pieces-") as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)
