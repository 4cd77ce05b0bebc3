"""Multi-source task training: several source languages, each batch under its own language module.

composable-sft trains a task SFT on several source languages at once, applying each batch's
language SFT before the step (Ansell et al. 2022, §3.3; substantially better than one source on
NusaX and AmericasNLI); MAD-X's recipe does the same with language adapters. xlpeft does it for
any language method under any task method, with the swap exact:

* **hooked modules** (adapters, Compacter, parallel, MAM, (IA)³, prefixes, unmerged LoRA): every
  source's module is applied once, *before* the task module is prepared, so its hooks run below
  the task module's at every site, as in a Stack. Each is applied under its own gate
  (:mod:`xlpeft.methods.gates`): only the current source's gate is open, the others' hooks change
  nothing, so a batch sees exactly the one-language Stack;
* **modules merged into the weights** (LT-SFT deltas, merged LoRA): applied when a batch of their
  language comes and removed (an exact copy back of what was overwritten) when another
  language's batch comes. The task method must not write those weights itself
  (``MethodSpec.trains_in_place``): reverting the language delta would undo the task's updates.

A module with new tokens (``train-lang --set new_tokens``) brings its vocabulary rows, hooked under
a gate of their own whichever kind the module is: each source's batches are encoded with that
source's tokenizer, so its new ids (which may be the same numbers as another source's) meet only
its own rows.

Which of the two a module is comes from the protocol: ``Applied.saved_tensors()`` is empty exactly
when a module is merged into the weights (:mod:`xlpeft.methods.base`). Before a run opens, the
recipe checks that each hooked module, switched off, leaves the base's outputs unchanged (a
plug-in method that hooks without :func:`~xlpeft.methods.gates.gate_hook` is refused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from xlpeft.errors import XlpeftError
from xlpeft.io import LoadedModule
from xlpeft.methods.base import Applied
from xlpeft.methods.gates import Gate, gated
from xlpeft.registry import get_method
from xlpeft.vocab import STEM, AppliedVocab, new_vocab_of, rows_for

SAMPLINGS = ("proportional", "uniform")


def sampling_probabilities(sizes: Sequence[int], sampling: str, temperature: float) -> list[float]:
    """The chance of each source per batch: ``uniform``, or ``proportional``: p_i ∝ n_i^(1/T).

    T = 1 samples sources by size; larger T flattens towards uniform (Conneau & Lample 2019's
    α = 1/T; XLM-R's α = 0.3 is T ≈ 3.3), so a 900-sentence treebank is not drowned by a 40,000-sentence one.
    """
    if sampling not in SAMPLINGS:
        raise XlpeftError(f"sampling should be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
    if not sizes or min(sizes) <= 0:
        raise XlpeftError(f"every source needs at least one training example; got sizes {list(sizes)}")
    if sampling == "uniform":
        return [1.0 / len(sizes)] * len(sizes)
    weights = [math.exp(math.log(n) / temperature) for n in sizes]  # n^(1/T), without overflow for large T
    return [w / sum(weights) for w in weights]


def _probe(base) -> torch.Tensor:
    """The encoder's hidden states on a fixed small batch (B=2, T=8), to check a closed gate changes nothing."""
    ids = torch.randint(5, len(base.tokenizer), (2, 8), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(base.model.parameters()).device)
    with torch.no_grad():
        return base.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


class LanguageSwitch:
    """Every source language's module on one base, exactly one of them acting at a time (:meth:`to`).

    Build it before the task module is prepared (its hooks must run above these). ``remove()``
    restores the base exactly; safe to call twice.
    """

    def __init__(self, base, modules: dict[str, LoadedModule], verify: bool = False) -> None:
        self.base = base
        self.current: str | None = None
        self._hooked: dict[str, tuple[Applied, Gate]] = {}
        self._merged: dict[str, LoadedModule] = {}  # applied per batch
        self._applied: Applied | None = None  # the merged module applied now
        self._vocab: dict[str, tuple[AppliedVocab, Gate]] = {}  # sources whose modules add new tokens
        try:
            for lang, module in modules.items():
                self._add(lang, module, verify)
        except BaseException:
            self.remove()
            raise

    def _add(self, lang: str, module: LoadedModule, verify: bool) -> None:
        vocab = new_vocab_of(module)
        was = self.base.model.training
        self.base.model.eval()  # the probe must not draw dropout
        try:
            before = _probe(self.base) if verify else None
            gate = Gate(open=False)
            with gated(gate):
                applied = get_method(module.manifest.method).apply(self.base, module)
            if not applied.saved_tensors():  # merged into the weights: applied when its batches come
                applied.remove()
                self._merged[lang] = module
            else:
                self._hooked[lang] = (applied, gate)
            if vocab is not None:  # after the method's hooks, as activate adds them
                vocab_gate = Gate(open=False)
                with gated(vocab_gate):
                    rows = rows_for(self.base.model, vocab, module.tensors[STEM])
                    self._vocab[lang] = (AppliedVocab(self.base.model, rows), vocab_gate)
            if lang in self._merged:
                return
            if verify and not torch.equal(_probe(self.base), before):
                raise XlpeftError(
                    f"the {lang} language module ({module.path}, method {module.manifest.method}) still changes the "
                    "base's outputs while it is switched off, so multi-source training cannot swap it between batches; "
                    "its method must register its hooks with xlpeft.methods.gates.gate_hook")
        finally:
            self.base.model.train(was)

    @property
    def merged(self) -> list[str]:
        """The sources whose modules are merged into the weights per batch (LT-SFT deltas, merged LoRA)."""
        return list(self._merged)

    def modules(self) -> list[nn.Module]:
        """The hooked modules' ``nn.Module`` s (to move with the base)."""
        return [m for applied, _ in [*self._hooked.values(), *self._vocab.values()] for m in applied.modules()]

    def to(self, lang: str) -> None:
        """Make ``lang``'s module the one acting; a no-op when it already is."""
        if lang == self.current:
            return
        if lang not in self._hooked and lang not in self._merged:
            raise XlpeftError(f"no language module for source {lang!r}; the sources are "
                              f"{', '.join([*self._hooked, *self._merged])}")
        if self._applied is not None:  # the exact copy back of what the merged module overwrote
            self._applied.remove()
            self._applied = None
        for other, (_, gate) in [*self._hooked.items(), *self._vocab.items()]:
            gate.open = other == lang
        if lang in self._merged:
            module = self._merged[lang]
            self._applied = get_method(module.manifest.method).apply(self.base, module)
        self.current = lang

    def remove(self) -> None:
        """Take every source's module off the base, restoring it exactly."""
        if self._applied is not None:
            self._applied.remove()
            self._applied = None
        for applied, _ in reversed([*self._hooked.values(), *self._vocab.values()]):
            applied.remove()
        self._hooked.clear()
        self._vocab.clear()
        self.current = None
