"""Labelled task data: CoNLL (``token<TAB>tag``), CoNLL-U (UPOS), JSONL (premise/hypothesis/label), HF datasets.

Token tasks label the *first* sub-word of each word (the others get -100), as in MAD-X and
LT-SFT; sentence-pair tasks label the whole sequence. The file readers live in
:mod:`xlpeft.data.formats` and are importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xlpeft.data.formats import PairExample, TokenExample, conllu_sentences, read_conll, read_conllu, read_jsonl
from xlpeft.errors import XlpeftError

if TYPE_CHECKING:
    from xlpeft.data.tagmaps import TagMap
    from xlpeft.packs import TaskPack

__all__ = ["PairExample", "TaskSource", "TokenExample", "conllu_sentences", "read_conll", "read_conllu", "read_jsonl",
           "read_source"]

FORMATS = ("conll", "conllu", "jsonl")


@dataclass(frozen=True)
class TaskSource:
    """One split of task data: a local file, a Hugging Face dataset, or a file ``xlpeft prepare-data`` writes.

    ``prepared`` is ``DATASET/PATH`` under the cache's ``data/`` folder (e.g.
    ``pos-universal/en/train.conll``): resolved when read, so a pack can name data that is
    prepared at run time and never committed.
    """

    path: str | None = None
    format: str | None = None  # conll | conllu | jsonl (local files; guessed from the suffix if unset)
    hf: str | None = None
    config: str | None = None
    split: str = "train"
    tokens_field: str = "tokens"
    tags_field: str = "ner_tags"
    label_map: dict[str, str] = field(default_factory=dict)  # e.g. {B-DATE: O} for MasakhaNER
    prepared: str | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("path", self.path), ("hf", self.hf), ("prepared", self.prepared)) if v is not None}
        if len(given) != 1:
            raise XlpeftError(f"task data needs exactly one of `path`, `hf` or `prepared`; got {given or 'none'}")
        if self.format is not None and self.format not in FORMATS:
            raise XlpeftError(f"task data format should be one of {', '.join(FORMATS)}; got {self.format!r}")

    def describe(self) -> str:
        if self.prepared:
            return f"prepared:{self.prepared}"
        return self.path or f"hf:{self.hf}:{self.config or ''}:{self.split}"

    def file_format(self) -> str:
        if self.format:
            return self.format
        suffix = Path(self.path or self.prepared or "").suffix.lower()
        return {".conllu": "conllu", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix, "conll")

    def local_path(self) -> Path | None:
        """The file to read: ``path``, or the prepared file (an error naming the command when it is missing)."""
        if self.prepared is not None:
            from xlpeft.data.registry_packages import prepared_file

            return prepared_file(self.prepared)
        return Path(self.path) if self.path is not None else None


def parse_task_data(spec: str) -> TaskSource:
    """``--train-data``/``--eval-data``: a file path or ``hf:NAME[:CONFIG][:SPLIT]``."""
    if spec.startswith("hf:"):
        from xlpeft.data.corpora import parse_hf_spec

        return TaskSource(**parse_hf_spec(spec, "task data"))
    return TaskSource(path=spec)


def data_fingerprint(*sources: TaskSource) -> str:
    """Content fingerprint of the task data a run reads: local and prepared files by content, hub data by name.

    Every source counts, the pack's own files included, so ``--resume`` and a pipeline's skip
    check notice a changed file whichever way it was named.
    """
    from xlpeft.data.corpora import fingerprint_files

    local = [str(p) for s in sources if s.hf is None and (p := s.local_path()) is not None and p.is_file()]
    return fingerprint_files(local, [s.describe() for s in sources if s.hf is not None])


def read_source(source: TaskSource, head: str, labels: list[str], input_map: TagMap | None = None) -> list[Any]:
    """Read every example of a source; labels are validated by :func:`check_labels`.

    Args:
        input_map: the task pack's map from input tags to its labels (the pos pack maps UD UPOS
            to the 12 universal tags), applied after the source's own ``label_map``; a tag it does
            not cover is left for :func:`check_labels` to report.
    """
    path = source.local_path()
    if path is not None:
        fmt = source.file_format()
        if head == "sequence_classification":
            examples = read_jsonl(path, labels)
        elif fmt == "conllu":
            examples = read_conllu(path)
        else:
            examples = read_conll(path)
    else:
        examples = _read_hf(source, head, labels)
    if source.label_map:
        examples = [_remap(e, source.label_map) for e in examples]
    if input_map is not None and head == "token_classification":
        examples = [TokenExample(e.tokens, tuple(input_map.get(t) or t for t in e.tags)) for e in examples]
    if not examples:
        raise XlpeftError(f"task data {source.describe()} holds no examples")
    check_labels(examples, labels, source.describe())
    return examples


def _remap(example, mapping: dict[str, str]):
    if isinstance(example, TokenExample):
        return TokenExample(example.tokens, tuple(mapping.get(t, t) for t in example.tags))
    return PairExample(example.premise, example.hypothesis, mapping.get(example.label, example.label))


def _read_hf(source: TaskSource, head: str, labels: list[str]) -> list[Any]:
    try:
        from datasets import load_dataset

        ds = load_dataset(source.hf, source.config, split=source.split)
    except Exception as exc:
        raise XlpeftError(
            f"could not load Hugging Face dataset {source.describe()} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a local file with --train-data/--eval-data"
        ) from None
    if head == "sequence_classification":
        names = ds.features["label"].names if hasattr(ds.features["label"], "names") else labels
        return [PairExample(r["premise"], r["hypothesis"], names[r["label"]] if isinstance(r["label"], int) else r["label"])
                for r in ds if r["label"] != -1]
    feature = ds.features[source.tags_field]
    names = getattr(getattr(feature, "feature", None), "names", None)
    return [TokenExample(tuple(r[source.tokens_field]),
                         tuple(names[t] if names and isinstance(t, int) else str(t) for t in r[source.tags_field]))
            for r in ds]


def check_labels(examples: list[Any], labels: list[str], where: str) -> None:
    """Every label in the data must be one the pack declares; otherwise say which and how to fix it."""
    known = set(labels)
    for i, e in enumerate(examples):
        found = e.tags if isinstance(e, TokenExample) else (e.label,)
        unknown = sorted(set(found) - known)
        if unknown:
            raise XlpeftError(
                f"{where}: example {i + 1} has label(s) {unknown} that the task pack does not know "
                f"(known: {', '.join(labels)}); fix the data or add a label_map to the pack's source"
            )


def load_examples(pack: TaskPack, lang: str, train_spec: str | None, eval_spec: str | None,
                  eval_fraction: float, seed: int) -> tuple[list, list, list[TaskSource]]:
    """Train and eval examples: explicit files win, else the pack's data, else a held-out slice of train.

    Returns:
        (train examples, eval examples, the sources read: training data first, then evaluation data if separate).

    Raises:
        XlpeftError: unreadable data, unknown labels, or a single training example and nothing to evaluate on.
    """
    labels = list(pack.labels)
    train_src: TaskSource = parse_task_data(train_spec) if train_spec else pack.source(lang, "train")
    train = read_source(train_src, pack.head, labels, pack.input_map)
    eval_src = (parse_task_data(eval_spec) if eval_spec else pack.source(lang, "validation")
                if "validation" in pack.sources.get(lang, {}) and not train_spec else None)
    if eval_src is not None:
        eval_ = read_source(eval_src, pack.head, labels, pack.input_map)
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = max(1, int(len(train) * eval_fraction))
        if len(train) < 2:
            raise XlpeftError("training data has a single example; pass --eval-data or more training data")
        eval_ = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in order[n_eval:]]
    return train, eval_, [train_src] + ([eval_src] if eval_src is not None else [])


NO_SUBWORD = -1
"""``Encoded.words`` entry for a word with no sub-word in the input (empty after tokenising, or cut)."""


@dataclass
class Encoded:
    """Tensors for a list of examples, plus where each word's label sits.

    ``words[i][w]`` is the position of word ``w``'s first sub-word in example ``i``, or
    :data:`NO_SUBWORD` when the word has none: it tokenised to nothing (U+200B, a soft hyphen,
    a lone combining mark...) or was cut by ``max_len``. One entry per word, so a word with no
    sub-word never shifts the words after it.
    """

    input_ids: list[list[int]]
    labels: list[Any]  # per token (list[int], -100 for ignored) or one int per example
    words: list[list[int]]  # token tasks: one position (or NO_SUBWORD) per word
    truncated: int = 0  # examples longer than max_len, cut to it
    words_cut: int = 0  # token tasks: words that lost all their sub-words to the cut


def encode_tokens(tokenizer, examples: list[TokenExample], label2id: dict[str, int], max_len: int) -> Encoded:
    """Tokenise pre-split words; label the first sub-word of each word, -100 elsewhere; truncate to ``max_len``.

    Labels are placed through the tokenizer's ``word_ids`` (sub-word -> word), so a word that
    yields no sub-word is skipped at its own position, never by shifting later labels.
    """
    words = [list(e.tokens) for e in examples]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_len)
    all_ids, all_labels, all_words = [], [], []
    for i, e in enumerate(examples):
        labels, firsts = first_subword_labels(enc.word_ids(i), len(e.tokens))
        all_ids.append(enc["input_ids"][i])
        all_labels.append([-100 if w is None else label2id[e.tags[w]] for w in labels])
        all_words.append(firsts)
    long_rows = [i for i, ids in enumerate(all_ids) if len(ids) >= max_len]
    truncated, words_cut = 0, 0
    if long_rows:  # which of those were really cut, and how many words lost every sub-word to the cut
        full = tokenizer([words[i] for i in long_rows], is_split_into_words=True, truncation=False)
        for j, i in enumerate(long_rows):
            if len(full["input_ids"][j]) > max_len:
                truncated += 1
                kept = {w for w in enc.word_ids(i) if w is not None}
                words_cut += len({w for w in full.word_ids(j) if w is not None} - kept)
    return Encoded(all_ids, all_labels, all_words, truncated, words_cut)


def first_subword_labels(word_ids: list[int | None], n_words: int) -> tuple[list[int | None], list[int]]:
    """(per position: the word whose label it carries or None, per word: its first position or NO_SUBWORD)."""
    carries: list[int | None] = []
    firsts = [NO_SUBWORD] * n_words
    previous = None
    for pos, w in enumerate(word_ids):
        if w is None or w == previous:
            carries.append(None)
        else:
            carries.append(w)
            firsts[w] = pos
        previous = w
    return carries, firsts


def encode_pairs(tokenizer, examples: list[PairExample], label2id: dict[str, int], max_len: int) -> Encoded:
    """Premise/hypothesis pairs, one label each; pairs longer than ``max_len`` are cut (longest first) and counted."""
    premises, hypotheses = [e.premise for e in examples], [e.hypothesis for e in examples]
    enc = tokenizer(premises, hypotheses, truncation=True, max_length=max_len)
    long_rows = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) >= max_len]
    truncated = 0
    if long_rows:
        full = tokenizer([premises[i] for i in long_rows], [hypotheses[i] for i in long_rows], truncation=False)
        truncated = sum(len(ids) > max_len for ids in full["input_ids"])
    return Encoded(enc["input_ids"], [label2id[e.label] for e in examples], [], truncated)


def collate(encoded: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence: input_ids (B, T), attention_mask (B, T), labels (B, T) or (B,)."""
    rows = [encoded.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    first = encoded.labels[indices[0]]
    if isinstance(first, list):
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for j, i in enumerate(indices):
            labels[j, : len(encoded.labels[i])] = torch.tensor(encoded.labels[i])
    else:
        labels = torch.tensor([encoded.labels[i] for i in indices], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
