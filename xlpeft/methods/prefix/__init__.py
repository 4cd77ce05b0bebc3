"""Prefix tuning (Li & Liang, ACL 2021) and prompt tuning (Lester et al., EMNLP 2021) as one method.

**Prefix tuning** (``layers=all``, the default): every layer's self-attention attends to
``prefix_length`` extra key and value vectors before the tokens' own. Training uses the paper's
reparameterisation (Li & Liang §4.3, peft's ``prefix_projection``): an embedding of
``prefix_length x hidden`` -> Linear(hidden, width) -> tanh -> Linear(width, num_layers * 2 * hidden);
``reparameterise=false`` trains the prefixes directly. At export the MLP is run once and dropped:
a saved module holds the per-layer key/value prefixes only, as the paper does.

**Prompt tuning** (``layers=input``) is the one-layer special case: ``prefix_length`` prompt
vectors prepended to the input *word* embeddings (Lester et al. 2021, peft's PROMPT_TUNING), so
they receive position + type embeddings and the embedding LayerNorm like tokens do. The real
tokens then sit at positions ``P .. P+T-1`` (as in peft). The virtual positions are stripped from
the layer stack's output, so MLM and token-classification outputs keep their length ``T``, and the
pooler / sequence head reads the real first token ([CLS] / <s>); peft's SEQ_CLS pools the first
*virtual* token instead, and its TOKEN_CLS returns ``P + T`` logits per row.

Composition (``combine="stack"``): modules applied together concatenate bottom first, so a
language prefix and a task prefix give keys ``[lang prefix; task prefix; tokens]`` (and prompts
``[lang prompt; task prompt; tokens]``). Prefix positions are always visible; padding stays masked.

Injection uses hooks only. Prefixes: a forward pre-hook (``with_kwargs``) on each self-attention
module passes a :class:`PrefixCache` as its ``cache`` argument; transformers' BERT/XLM-R
self-attention calls ``cache.update(key, value, layer_idx)``, which prepends the prefixes
(B, heads, P, d), and the hook widens ``attention_mask`` by ``P`` visible columns (None, 2-D,
4-D additive float and 4-D bool masks: eager and sdpa). Unlike passing ``past_key_values`` to the
whole model (peft's route), the real tokens' position ids are not shifted by ``P`` (as in
AdapterHub); ``shift_positions=true`` numbers them from ``P`` as peft does (a pre-hook on the
embeddings passes ``cache_length``), which reproduces peft's logits.

Saved tensor layout (file stem ``prefix``; ``H`` = hidden size = heads x head dim, ``L`` = layers):

* ``layers=all``:   ``key`` (L, P, H) and ``value`` (L, P, H); head ``h`` of layer ``i`` is
  ``key[i, :, h*d:(h+1)*d]`` (peft's per-layer layout, heads split as the model splits its keys);
* ``layers=input``: ``prompt`` (P, H), the virtual word embeddings.

Public API, stable (MAM imports it):

* :class:`PrefixConfig`, :class:`PrefixEncoder` (trainable source), :class:`SavedPrefixes`
  (frozen source built from the saved layout);
* a *source* is any ``nn.Module`` with ``layer(i) -> (key (P, H), value (P, H))`` (``layers=all``)
  or ``prompts() -> (P, H)`` (``layers=input``) and ``config.layers``;
* :func:`attach_prefix(model, arch, source) <attach_prefix>` -> :class:`Attachment`, whose
  ``remove()`` (idempotent) takes that source off; sources attached to one model concatenate in
  attach order whatever is removed in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xlpeft.config import build, check_fields
from xlpeft.errors import XlpeftError
from xlpeft.methods.base import AppliedModule, MethodSpec, ModuleTrainable, Phase
from xlpeft.methods.prefix.inject import Attachment, PrefixCache, attach_prefix, extend_mask

LAYERS = ("all", "input")
"""``all``: key/value prefixes in every layer (Li & Liang 2021); ``input``: prompts on the input embeddings (Lester et al. 2021)."""

STEM = "prefix"
__all__ = ["Attachment", "PrefixCache", "PrefixConfig", "PrefixEncoder", "SPEC", "SavedPrefixes", "attach_prefix",
           "expected_shapes", "extend_mask"]


@dataclass(frozen=True)
class PrefixConfig:
    """Hyper-parameters of a prefix (or prompt) module: length 30 (He et al. 2022's MAM prefix), MLP width 512 (Li & Liang 2021)."""

    prefix_length: int = field(default=30, metadata={
        "help": "number of prefix (or prompt) vectors P; 30 as He et al. 2022 use for MAM's prefix "
                "(Li & Liang 2021 used 5-200)", "min": 1})
    layers: str = field(default="all", metadata={
        "help": "all: key/value prefixes in every layer (prefix tuning); input: prompt vectors on the input "
                "embeddings only (prompt tuning, Lester et al. 2021)", "choices": LAYERS})
    reparameterise: bool | None = field(default=None, metadata={
        "help": "train through the MLP reparameterisation (embedding -> Linear -> tanh -> Linear, dropped at "
                "export); None follows layers: true for all (Li & Liang 2021), false for input (Lester et al. 2021)"})
    width: int = field(default=512, metadata={
        "help": "hidden width of the reparameterisation MLP (Li & Liang 2021: 512)", "min": 1})
    shift_positions: bool = field(default=False, metadata={
        "help": "layers=all: number the real tokens from P, as peft's past_key_values route does (needed to "
                "reproduce peft's logits); false keeps their positions, as AdapterHub does"})

    def __post_init__(self) -> None:
        extra = []
        if self.shift_positions and self.layers == "input":
            extra.append("`shift_positions` applies to layers=all only (prompts are tokens: they always shift "
                         "the real tokens by P); drop it or use layers=all")
        check_fields(self, extra)
        if self.reparameterise is None:  # resolved here, so manifests record what was trained
            object.__setattr__(self, "reparameterise", self.layers == "all")


class PrefixEncoder(nn.Module):
    """The trainable source: ``P`` vectors, optionally through Li & Liang's MLP (their §4.3 reparameterisation).

    Output columns follow peft's layout: for layer ``i``, ``[2iH, (2i+1)H)`` is the key prefix and
    ``[(2i+1)H, (2i+2)H)`` the value prefix; ``layers=input`` has ``H`` columns, the prompt.
    """

    def __init__(self, config: PrefixConfig, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.config, self.hidden_size, self.num_layers = config, hidden_size, num_layers
        out = num_layers * 2 * hidden_size if config.layers == "all" else hidden_size
        # nn.Embedding's N(0, 1) init and nn.Linear's default init, as peft's PrefixEncoder / PromptEmbedding (random)
        self.embedding = nn.Embedding(config.prefix_length, hidden_size if config.reparameterise else out)
        self.mlp = (nn.Sequential(nn.Linear(hidden_size, config.width), nn.Tanh(), nn.Linear(config.width, out))
                    if config.reparameterise else None)

    def _columns(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``[start, stop)`` of the source's output (P, stop - start), computing only those rows of the MLP."""
        if self.mlp is None:
            return self.embedding.weight[:, start:stop]
        hidden = self.mlp[1](self.mlp[0](self.embedding.weight))  # (P, width)
        last: nn.Linear = self.mlp[2]
        return nn.functional.linear(hidden, last.weight[start:stop], last.bias[start:stop])  # (P, stop - start)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value prefixes of layer ``i``, each (P, H)."""
        h = self.hidden_size
        both = self._columns(2 * i * h, (2 * i + 2) * h)  # (P, 2H)
        return both[:, :h], both[:, h:]

    def prompts(self) -> torch.Tensor:
        """The prompt vectors (P, H) of ``layers=input``."""
        return self._columns(0, self.hidden_size)

    @torch.no_grad()
    def export(self) -> dict[str, torch.Tensor]:
        """The saved layout (module docstring): the MLP run once, per layer exactly as in training."""
        if self.config.layers == "input":
            return {"prompt": self.prompts().detach().clone()}
        pairs = [self.layer(i) for i in range(self.num_layers)]
        return {"key": torch.stack([k for k, _ in pairs]).clone(),  # (L, P, H)
                "value": torch.stack([v for _, v in pairs]).clone()}  # (L, P, H)


class SavedPrefixes(nn.Module):
    """A frozen source built from the saved layout (``key``/``value`` (L, P, H), or ``prompt`` (P, H))."""

    def __init__(self, config: PrefixConfig, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = config
        for name, tensor in state.items():
            self.register_parameter(name, nn.Parameter(tensor.detach().clone(), requires_grad=False))

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key[i], self.value[i]  # (P, H) each

    def prompts(self) -> torch.Tensor:
        return self.prompt  # (P, H)


def expected_shapes(config: PrefixConfig, hidden_size: int, num_layers: int) -> dict[str, tuple[int, ...]]:
    """The saved layout's tensor shapes for a base (used to validate loaded and converted modules)."""
    p = config.prefix_length
    if config.layers == "input":
        return {"prompt": (p, hidden_size)}
    return {"key": (num_layers, p, hidden_size), "value": (num_layers, p, hidden_size)}


# ---- the method

class PrefixTrainable(ModuleTrainable):
    """Trains a :class:`PrefixEncoder`; the checkpoint is its state (MLP included), the export the prefixes only."""

    def export(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        return {STEM: self.module.export()}, {}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare_prefix(base, config: PrefixConfig, train_cfg) -> PrefixTrainable:
    """Start training a fresh prefix module on ``base``, above the prefixes already applied."""
    module = PrefixEncoder(config, base.hidden_size, len(base.layers)).to(_device(base.model))
    attachment = attach_prefix(base.model, base.arch, module)
    return PrefixTrainable(module, attachment.remove, Phase(STEM, train_cfg.max_steps), STEM)


def apply_prefix(base, loaded) -> AppliedModule:
    """Rebuild a saved prefix module (checked against the base's shapes) and attach it to ``base``, frozen."""
    config = build(PrefixConfig, loaded.manifest.config)
    state = loaded.tensors.get(STEM)
    if state is None:
        raise XlpeftError(f"prefix module {loaded.path} has no {STEM}.safetensors; it is incomplete: retrain or "
                          "re-convert it")
    expected = expected_shapes(config, base.hidden_size, len(base.layers))
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise XlpeftError(f"prefix tensors in {loaded.path} do not fit this base: expected {expected}, got {got}; "
                          "apply it to the base it was trained on")
    module = SavedPrefixes(config, state).to(_device(base.model)).eval()
    return AppliedModule(module, attach_prefix(base.model, base.arch, module).remove, STEM)


def train_defaults(kind: str) -> dict[str, Any]:
    """lr 1e-3 for both kinds, chosen on English development data only (benchmarks/README.md, issue 18).

    peft's ``examples/sequence_classification/prefix_tuning.ipynb`` uses 1e-2, but for prefixes trained
    directly; through the MLP reparameterisation (our default, Li & Liang 2021) 1e-2 diverged on
    e5-small: an English POS task module collapsed to the majority tag (Brown dev 0.285, 1e-3: 0.933) and
    an English MLM module ended above its starting held-out loss (6.56 -> 6.82; 1e-3: 5.47, 1e-4: 6.03).
    Li & Liang's 5e-5..8e-5 was for generation runs of several epochs, far more steps than a module gets here.
    """
    return {"lr": 1e-3}


SPEC = MethodSpec(
    name="prefix",
    config_cls=PrefixConfig,
    prepare=prepare_prefix,
    apply=apply_prefix,
    combine="stack",  # prefixes concatenate: [language prefix; task prefix; tokens]
    help="prefix tuning (Li & Liang 2021): per-layer key/value prefixes, MLP-reparameterised in training; "
         "layers=input: prompt tuning (Lester et al. 2021)",
    train_defaults=train_defaults,
    files=(STEM,),
    identity_at_init=False,  # the prefixes are attended to from step 0 (Li & Liang 2021)
    prepare_checks_base=True,  # what prepare checks against the base (targets, sizes, layers) fails before a run opens
)
