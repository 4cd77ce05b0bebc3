"""New sub-word embeddings carried by a language module, for a language the base tokenizer cuts finely.

A script the base vocabulary covers poorly is split into many short pieces (``xlpeft coverage``
measures it), and a language module trained on top cannot give a frequent word a representation
of its own (Pfeiffer et al. 2021, "UNKs Everywhere: Adapting Multilingual Language Models to New
Scripts"). ``train-lang --set new_tokens=N`` adds the N most frequent words of the corpus that the
base tokenizer splits into several pieces as whole-word tokens, each embedded by a new row that is
initialised as the mean of the base embeddings of the pieces it replaces (the overlapping sub-words:
an untrained new token starts where the base's reading of it is) and trained with the module.
For scripts written without spaces, ``--set new_token_unit=piece`` adds sub-word pieces instead
(:mod:`xlpeft.vocab.pieces`).

The base stays untouched: new ids come after the base tokenizer's, a pre-hook on the word
embeddings maps them to row 0 and a forward hook writes the new rows at their positions; on a
masked-LM model a hook on the decoder appends their logits (tied to the same rows, as the base
ties its decoder to its embeddings), so the MLM loss predicts new tokens too. The rows travel in
the module (``vocab.safetensors``; the words in its manifest's ``extra.new_vocab``) and
:func:`extended_tokenizer` rebuilds the tokenizer that produces their ids.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from xlpeft.errors import XlpeftError

STEM = "vocab"
EXTRA = "new_vocab"  # manifest extra key: {"tokens": [...], "first_id": int, "unit": str[, "scores": [...]]}
UNITS = ("word", "piece")


@dataclass(frozen=True)
class NewVocab:
    """The words (or pieces) a module adds, in id order from ``first_id`` (the base tokenizer's length).

    ``unit`` "word": whole-word added tokens; "piece": sub-word pieces of the base's own model, with
    ``scores`` their Unigram log-probabilities (empty for WordPiece).
    """

    tokens: tuple[str, ...]
    first_id: int
    unit: str = "word"
    scores: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.tokens or len(set(self.tokens)) != len(self.tokens) or self.first_id < 1:
            raise XlpeftError(f"new vocabulary should be distinct tokens after id {self.first_id} >= 1; got "
                              f"{len(self.tokens)} token(s), {len(set(self.tokens))} distinct")
        if self.unit not in UNITS or (self.scores and (self.unit != "piece" or len(self.scores) != len(self.tokens))):
            raise XlpeftError(f"new vocabulary unit should be one of {UNITS} (scores only for pieces, one each); got "
                              f"unit {self.unit!r} with {len(self.scores)} score(s) for {len(self.tokens)} token(s)")

    def to_extra(self) -> dict:
        return {"tokens": list(self.tokens), "first_id": self.first_id, "unit": self.unit,
                **({"scores": list(self.scores)} if self.scores else {})}

    @classmethod
    def from_extra(cls, extra: dict) -> NewVocab | None:
        data = extra.get(EXTRA)
        if not data:
            return None
        return cls(tuple(data["tokens"]), int(data["first_id"]), data.get("unit", "word"),
                   tuple(float(s) for s in data.get("scores", ())))


def select_words(lines: Iterable[str], tokenizer, n: int, min_count: int = 3, max_lines: int = 200_000) -> list[str]:
    """The ``n`` most frequent whitespace words of ``lines`` the tokenizer splits into two or more pieces.

    A word it already holds whole (or as a token string of its vocabulary) gains nothing from a new row; a word seen fewer than ``min_count``
    times would get a row trained on almost nothing. Ties go to the earlier word, so the choice is
    deterministic. Only the first ``max_lines`` lines are counted (a 10^9-token corpus need not be read).
    """
    counts: Counter[str] = Counter()
    for i, line in enumerate(lines):
        if i >= max_lines:
            break
        counts.update(line.split())
    chosen, known = [], tokenizer.get_vocab()
    for word, count in counts.most_common():
        if count < min_count or len(chosen) == n:
            break
        if word not in known and len(tokenizer(word, add_special_tokens=False)["input_ids"]) >= 2:
            chosen.append(word)
    return chosen


def plan_new_vocab(corpora: list, tokenizer, n: int, min_count: int, unit: str = "word") -> NewVocab | None:
    """The new vocabulary ``train-lang --set new_tokens=N`` adds (None for N = 0), chosen from the corpora's first lines.

    Fewer qualifying words than asked is said on stderr; none at all is an error (nothing to add). The
    choice is kept per process: ``xlpeft run`` plans a step to tell whether it is done, then runs it.
    """
    from xlpeft.data.corpora import fingerprint_corpora
    from xlpeft.data.token_store import tokenizer_fingerprint

    if n == 0:
        return None
    key = (fingerprint_corpora(corpora), tokenizer_fingerprint(tokenizer), n, min_count, unit)
    if key not in _PLANNED:
        _PLANNED[key] = _choose(corpora, tokenizer, n, min_count, unit)
    return _PLANNED[key]


_PLANNED: dict[tuple, NewVocab] = {}  # plan_new_vocab's choices in this process


def _choose(corpora: list, tokenizer, n: int, min_count: int, unit: str) -> NewVocab:
    import itertools
    import sys

    from xlpeft.data.corpora import iter_lines
    from xlpeft.vocab.pieces import select_pieces

    lines = itertools.chain.from_iterable(iter_lines(c) for c in corpora)
    words, scores = (select_words(lines, tokenizer, n, min_count), []) if unit == "word" else select_pieces(
        lines, tokenizer, n, min_count)
    what = "word" if unit == "word" else "piece of a sub-word model trained on it"
    if not words:
        raise XlpeftError(f"new_tokens={n}: no {what} of the corpus occurs {min_count}+ times and is split by the "
                          "base tokenizer, so there is nothing to add; lower --set new_token_min_count, or train "
                          "without new_tokens")
    if len(words) < n:
        print(f"new_tokens: {len(words)} {unit}s of the {n} asked for (only these occur {min_count}+ times and are "
              "split by the base tokenizer)", file=sys.stderr)
    return NewVocab(tuple(words), len(tokenizer), unit, tuple(scores))


def extended_tokenizer(tokenizer, vocab: NewVocab):
    """A copy of ``tokenizer`` that gives ``vocab``'s words (or pieces) their ids; the original is unchanged."""
    from tokenizers import AddedToken

    if vocab.unit == "piece":
        from xlpeft.vocab.pieces import with_pieces

        return with_pieces(tokenizer, vocab.tokens, vocab.scores, vocab.first_id)
    if len(tokenizer) != vocab.first_id:
        raise XlpeftError(f"the module's new vocabulary starts at id {vocab.first_id}, but this tokenizer has "
                          f"{len(tokenizer)} tokens: it was trained with another tokenizer (use the module's own base)")
    extended = copy.deepcopy(tokenizer)
    # lstrip: the space before a new word is part of its match, so a Metaspace (XLM-R) tokenizer does not emit a
    # lone "▁" before it, and the word is one token where the base's own whole words are one token too
    extended.add_tokens([AddedToken(t, single_word=True, lstrip=True, normalized=True) for t in vocab.tokens])
    got = extended.convert_tokens_to_ids(list(vocab.tokens))
    expected = list(range(vocab.first_id, vocab.first_id + len(vocab.tokens)))
    if got != expected:
        raise XlpeftError(f"the tokenizer did not give the new words the ids {vocab.first_id}.."
                          f"{expected[-1]} (some are already tokens of it?); got {got[:5]}...")
    return extended


class VocabRows(nn.Module):
    """The new rows: embeddings (N, H) and, for a masked-LM decoder with a bias, its bias entries (N,)."""

    def __init__(self, vocab: NewVocab, hidden: int, with_bias: bool) -> None:
        super().__init__()
        self.vocab = vocab
        self.weight = nn.Parameter(torch.zeros(len(vocab.tokens), hidden))  # (N, H)
        self.bias = nn.Parameter(torch.zeros(len(vocab.tokens))) if with_bias else None  # (N,)

    def init_from_pieces(self, model: nn.Module, tokenizer) -> None:
        """Each row the mean of the base embeddings (and decoder biases) of the pieces its word splits into."""
        from xlpeft.vocab.pieces import base_reader

        emb = model.get_input_embeddings().weight  # (V, H)
        decoder = model.get_output_embeddings()
        read = base_reader(tokenizer) if self.vocab.unit == "piece" else None
        with torch.no_grad():
            for i, word in enumerate(self.vocab.tokens):
                ids = read(word) if read else tokenizer(word, add_special_tokens=False)["input_ids"]
                pieces = torch.tensor(ids)  # (P,)
                self.weight[i] = emb[pieces].float().mean(0)
                if self.bias is not None and decoder is not None and decoder.bias is not None:
                    self.bias[i] = decoder.bias[pieces].float().mean()


class AppliedVocab:
    """The rows hooked into a model: new ids read their rows, and a masked-LM decoder scores them too.

    Hooked with :func:`~xlpeft.methods.gates.gate_hook`, so under a closed gate (multi-source training,
    another source's batch) they change nothing.
    """

    def __init__(self, model: nn.Module, rows: VocabRows) -> None:
        from xlpeft.methods.gates import gate_hook

        self.rows, first = rows, rows.vocab.first_id
        state: dict[str, torch.Tensor] = {}
        emb = model.get_input_embeddings()

        def before(module, args):
            ids = args[0]  # (B, T)
            state["new"] = new = ids >= first  # (B, T)
            state["row"] = (ids - first).clamp(min=0)  # (B, T), 0 where not new
            return (ids.masked_fill(new, 0), *args[1:])

        def after(module, args, out):
            new, row = state.pop("new"), state.pop("row")
            if not bool(new.any()):
                return out
            return torch.where(new.unsqueeze(-1), rows.weight[row].to(out.dtype), out)  # (B, T, H)

        self._handles = [emb.register_forward_pre_hook(gate_hook(before)), emb.register_forward_hook(gate_hook(after))]
        decoder = model.get_output_embeddings()
        if decoder is not None:  # a masked-LM model: the new tokens are predicted too
            def scores(module, args, out):
                h = args[0]  # (M, H) or (B, T, H)
                extra = h @ rows.weight.to(h.dtype).T  # (..., N)
                if rows.bias is not None:
                    extra = extra + rows.bias.to(h.dtype)
                return torch.cat([out[..., :first], extra], dim=-1)  # (..., first + N)

            self._handles.append(decoder.register_forward_hook(gate_hook(scores)))

    def modules(self) -> list[nn.Module]:
        return [self.rows]

    def remove(self) -> None:
        """Unhook; the base's own weights were never changed."""
        while self._handles:
            self._handles.pop().remove()


def rows_for(model: nn.Module, vocab: NewVocab, state: dict[str, torch.Tensor] | None = None) -> VocabRows:
    """Rows sized for ``model`` (fresh, or holding a saved module's ``state``), frozen when loaded."""
    hidden = model.get_input_embeddings().weight.shape[1]
    if state is not None:  # as saved (a task model has no decoder, yet keeps the rows' MLM biases)
        with_bias = "bias" in state
    else:
        decoder = model.get_output_embeddings()
        with_bias = decoder is not None and decoder.bias is not None
    rows = VocabRows(vocab, hidden, with_bias)
    if state is not None:
        rows.load_state_dict(state)
        rows.requires_grad_(False)
    return rows


class WithVocab:
    """A method's :class:`~xlpeft.methods.base.Trainable` with new vocabulary rows trained in every phase beside it."""

    PREFIX = "xlpeft_vocab."  # checkpoint keys of the rows, apart from the method's own

    def __init__(self, inner, rows: VocabRows, applied: AppliedVocab) -> None:
        self.inner, self.rows, self.applied = inner, rows, applied
        self.phases = inner.phases

    def begin_phase(self, phase) -> list[nn.Parameter]:
        return [*self.inner.begin_phase(phase), *self.rows.parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.inner.state_dict(), **{self.PREFIX + k: v for k, v in self.rows.state_dict().items()}}

    def resume_phase(self, phase, state: dict[str, torch.Tensor]) -> list[nn.Parameter]:
        mine = {k.removeprefix(self.PREFIX): v for k, v in state.items() if k.startswith(self.PREFIX)}
        self.rows.load_state_dict(mine)
        rest = {k: v for k, v in state.items() if not k.startswith(self.PREFIX)}
        return [*self.inner.resume_phase(phase, rest), *self.rows.parameters()]

    def after_step(self, phase, step: int) -> None:
        self.inner.after_step(phase, step)

    def end_phase(self, phase) -> dict[str, float]:
        return self.inner.end_phase(phase)

    def replicated(self) -> torch.Tensor | None:
        return self.inner.replicated()

    def export(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        tensors, extra = self.inner.export()
        return {**tensors, STEM: {k: v.detach().clone() for k, v in self.rows.state_dict().items()}}, {
            **extra, EXTRA: self.rows.vocab.to_extra()}

    def close(self) -> None:
        self.applied.remove()
        self.inner.close()


class MergedAlready:
    """The :class:`~xlpeft.methods.base.Applied` handle of a delta a composed checkpoint already holds in its weights."""

    def remove(self) -> None:
        pass

    def modules(self) -> list[nn.Module]:
        return []

    def saved_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}


class WithVocabApplied:
    """A saved module's :class:`~xlpeft.methods.base.Applied` handle and its vocabulary rows, removed together."""

    def __init__(self, inner, vocab: AppliedVocab) -> None:
        self.inner, self.vocab = inner, vocab

    def remove(self) -> None:
        self.vocab.remove()
        self.inner.remove()

    def modules(self) -> list[nn.Module]:
        return [*self.inner.modules(), *self.vocab.modules()]

    def saved_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {**self.inner.saved_tensors(), STEM: self.vocab.rows.state_dict()}


def new_vocab_of(module) -> NewVocab | None:
    """The new vocabulary a loaded module carries, or None; a half-present one is a corrupted module."""
    vocab = NewVocab.from_extra(module.manifest.extra)
    if (vocab is None) != (STEM not in module.tensors):
        raise XlpeftError(f"{module.path}: the manifest's extra.{EXTRA} and {STEM}.safetensors should come together; "
                          "the module is corrupted")
    return vocab


def composition_vocab(modules) -> NewVocab | None:
    """The new vocabulary of the one module among ``modules`` that adds some; two such modules are refused."""
    adding = [(m, v) for m in modules if (v := new_vocab_of(m)) is not None]
    if len(adding) > 1:
        raise XlpeftError(f"{adding[0][0].path} and {adding[1][0].path} both add new vocabulary; a composition can "
                          "hold one module with new tokens (their ids would collide)")
    return adding[0][1] if adding else None


def tokenizer_for(base_tokenizer, modules):
    """``base_tokenizer``, or a copy with the new words of the one module among ``modules`` that adds some."""
    vocab = composition_vocab(modules)
    return base_tokenizer if vocab is None else extended_tokenizer(base_tokenizer, vocab)


def with_vocab(model: nn.Module, module, handle):
    """``handle`` (the method's, just applied) with ``module``'s vocabulary rows hooked too, if it has any."""
    vocab = new_vocab_of(module)
    if vocab is None:
        return handle
    rows = rows_for(model, vocab, module.tensors[STEM])
    try:
        return WithVocabApplied(handle, AppliedVocab(model, rows))
    except BaseException:
        handle.remove()
        raise
