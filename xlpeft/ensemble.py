"""Test-time ensembles for a target language without a module of its own.

The task module runs once over each of several existing language modules and their predictive
distributions are averaged (the ``Average`` of the composition blocks, at the output): p = Σ_i α_i p_i.
With EMEA (Wang et al. 2021, "Efficient Test Time Adapter Ensembling for Low-resource Language
Varieties") the weights α = softmax(w) are adapted per batch by a few gradient steps that minimise
the entropy of p on that (unlabelled) batch, starting from the uniform average. Wang et al. weight
the language adapters' outputs inside every layer; xlpeft weights the members' output
distributions, which works for every module family (adapters, deltas, prompts) and needs no
gradient through the encoder. The ensemble's ``logits`` are log p, so argmax and softmax are the
ensemble's own.

Members that add new tokens (``train-lang --set new_tokens``) read the same text as different
sub-words, so their outputs do not line up position by position: :meth:`Ensemble.predict` then
encodes the examples once per member with that member's tokenizer and mixes the distributions
*per word* (at each word's first sub-word, where a single model's prediction is read too) or per
example, with EMEA's weights fitted on those word distributions per batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from xlpeft.compose import Composition, ModuleRef, activate
from xlpeft.config import check_fields
from xlpeft.errors import XlpeftError
from xlpeft.vocab import tokenizer_for


@dataclass(frozen=True)
class EnsembleConfig:
    """EMEA's settings: entropy-minimisation steps per batch (0: the plain average) and their learning rate."""

    emea_steps: int = field(default=0, metadata={
        "help": "gradient steps on the ensemble weights per batch, minimising the prediction entropy (0: the plain "
                "average; EMEA, Wang et al. 2021)", "min": 0})
    emea_lr: float = field(default=10.0, metadata={
        "help": "learning rate of those steps on the pre-softmax weights (plain gradient descent, as Wang et al.'s "
                "script; xlpeft's default, not tuned on any test set)", "gt": 0.0})

    def __post_init__(self) -> None:
        extra = [] if math.isfinite(self.emea_lr) else [f"`emea_lr` should be a finite number; got {self.emea_lr}"]
        check_fields(self, extra=extra)


def ensemble_weights(log_probs: torch.Tensor, mask: torch.Tensor | None, config: EnsembleConfig) -> torch.Tensor:
    """α (n,): uniform, then ``emea_steps`` steps of gradient descent on the entropy of Σ α_i p_i.

    Args:
        log_probs: (n, B, ..., C) each member's log-probabilities.
        mask: (B, T) positions that count (token tasks: the attention mask), or None (every row).
    """
    n = log_probs.shape[0]
    w = torch.zeros(n, dtype=torch.float32, device=log_probs.device)  # (n,) softmax(0) = the plain average
    lp = log_probs.detach().float()
    for _ in range(config.emea_steps):
        with torch.enable_grad():  # evaluation runs under no_grad; only w needs a gradient
            w.requires_grad_(True)
            mixed = torch.logsumexp(lp + torch.log_softmax(w, 0).view(n, *[1] * (lp.dim() - 1)), dim=0)  # (B, ..., C)
            entropy = -(mixed.exp() * mixed).sum(-1)  # (B, ...) per position
            if mask is not None and entropy.dim() == mask.dim():
                m = mask.to(entropy.dtype)
                loss = (entropy * m).sum() / m.sum().clamp(min=1)
            else:
                loss = entropy.mean()
            (grad,) = torch.autograd.grad(loss, w)
        w = (w - config.emea_lr * grad).detach()
    return torch.softmax(w.detach(), 0)  # (n,)


class Ensemble(nn.Module):
    """The task module over each language module in turn; outputs mixed per batch (log Σ α_i p_i).

    One Hugging Face model holds the task head; each member's composition is activated on it for its
    forward pass and removed after, so members never see each other's modules.
    """

    def __init__(self, base, model: nn.Module, members: list[ModuleRef], task: ModuleRef,
                 config: EnsembleConfig = EnsembleConfig()) -> None:
        super().__init__()
        if not members:
            raise XlpeftError("an ensemble needs at least one language module")
        self.base, self.model, self.settings = base, model, config
        self.config = model.config  # what evaluation reads (position limits)
        self.members = [Composition.of([lang, task], base.fingerprint) for lang in members]
        self.tokenizers = [tokenizer_for(base.tokenizer, [lang.module]) for lang in members]  # new tokens: their own
        self.last_weights: torch.Tensor | None = None  # α of the latest batch, for reports and tests

    @property
    def shared_tokenizer(self) -> bool:
        """Whether every member reads the base's tokenization (then one forward pass mixes them position-wise)."""
        return all(t is self.base.tokenizer for t in self.tokenizers)

    def member_logits(self, batch: dict[str, torch.Tensor], only: int | None = None) -> torch.Tensor:
        """(n, B, ..., C) the task module's logits over each member's language module (or member ``only``'s, (1, ...))."""
        out = []
        for i, composition in enumerate(self.members):
            if only is not None and i != only:
                continue
            active = activate(dataclasses.replace(self.base, model=self.model), composition, force=True)
            try:
                with torch.no_grad():
                    out.append(self.model(**batch).logits)
            finally:
                active.remove()
        return torch.stack(out)

    def forward(self, **batch: torch.Tensor) -> SimpleNamespace:
        if not self.shared_tokenizer:
            raise XlpeftError("this ensemble's members add new tokens, so they tokenize the same text differently and "
                              "one batch of ids cannot feed them all: score it with Ensemble.predict(pack, examples)")
        log_probs = torch.log_softmax(self.member_logits(batch).float(), dim=-1)  # (n, B, ..., C)
        alpha = ensemble_weights(log_probs, batch.get("attention_mask"), self.settings)  # (n,)
        self.last_weights = alpha
        shape = (len(alpha), *[1] * (log_probs.dim() - 1))
        return SimpleNamespace(logits=torch.logsumexp(log_probs + alpha.log().view(shape), dim=0))  # (B, ..., C)


    def predict(self, pack, examples: list, batch_size: int = 32) -> list:
        """Predicted labels (per example, or per word for token tasks), each member reading its own tokenization."""
        from xlpeft.evaluation import default_label, encode, model_max_len, predict_model

        if self.shared_tokenizer:
            return predict_model(self, pack, self.base.tokenizer, examples)
        device, max_len = next(self.model.parameters()).device, model_max_len(self.model)
        encs = [encode(pack, tok, examples, max_len) for tok in self.tokenizers]
        token_task, fallback = pack.head == "token_classification", default_label(pack)
        order = sorted(range(len(examples)), key=lambda i: len(encs[0].input_ids[i]))
        out: list = [None] * len(examples)
        for start in range(0, len(examples), batch_size):
            idx = order[start:start + batch_size]
            per_member = [self._member_log_probs(i, enc, idx, token_task, device) for i, enc in enumerate(encs)]
            log_probs = torch.stack([lp for lp, _ in per_member])  # (n, B, W, C) or (n, B, C)
            seen = torch.stack([s for _, s in per_member]).any(0) if token_task else None  # (B, W)
            alpha = ensemble_weights(log_probs, seen, self.settings)  # (n,)
            self.last_weights = alpha
            shape = (len(alpha), *[1] * (log_probs.dim() - 1))
            best = torch.logsumexp(log_probs + alpha.log().view(shape), dim=0).argmax(-1).cpu()  # (B, W) or (B,)
            for row, i in enumerate(idx):
                if token_task:
                    out[i] = [pack.labels[best[row, w]] if seen[row, w] else fallback
                              for w in range(len(examples[i].tokens))]
                else:
                    out[i] = pack.labels[best[row]]
        return out

    def _member_log_probs(self, member: int, enc, idx: list[int], token_task: bool, device):
        """Member ``member``'s log-probabilities for examples ``idx``: (B, W, C) at each word's first sub-word
        (uniform where the word has none in this tokenization) and which words it saw (B, W); or (B, C) and None."""
        from xlpeft.data.tasks import NO_SUBWORD, collate

        tok = self.tokenizers[member]
        batch = {k: v.to(device) for k, v in collate(enc, idx, tok.pad_token_id).items() if k != "labels"}
        lp = torch.log_softmax(self.member_logits(batch, only=member)[0].float(), dim=-1)  # (B, T, C) or (B, C)
        if not token_task:
            return lp, None
        width = max(len(enc.words[i]) for i in idx)
        words = torch.full((len(idx), width, lp.shape[-1]), -math.log(lp.shape[-1]), device=lp.device)  # uniform
        seen = torch.zeros((len(idx), width), dtype=torch.bool, device=lp.device)
        for row, i in enumerate(idx):
            for w, pos in enumerate(enc.words[i]):
                if pos != NO_SUBWORD:
                    words[row, w], seen[row, w] = lp[row, pos], True
        return words, seen


def build_ensemble(base, members: list[ModuleRef], task: ModuleRef,
                   config: EnsembleConfig = EnsembleConfig()) -> Ensemble:
    """An :class:`Ensemble` of ``task`` over ``members`` (language modules), in eval mode.

    Raises:
        XlpeftError: a member that is not a language module, or one trained on another base.
    """
    from xlpeft.compose import check_same_base
    from xlpeft.composed import target_model
    for m in members:
        m.module.expect_kind("language", f"ensemble member {m.source}")
    check_same_base(base, [m.module for m in members] + [task.module])
    model = target_model(base, task.module)
    return Ensemble(base, model, members, task, config).eval()
