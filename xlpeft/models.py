"""Base encoders: aliases, the per-architecture table of module paths, loading, freezing, fingerprints.

The base is always loaded as a masked-LM model and frozen (MLM head included); every
module artifact records the base's fingerprint so it is never silently applied to
different weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xlpeft.errors import XlpeftError

ALIASES: dict[str, str] = {
    "mbert": "google-bert/bert-base-multilingual-cased",
    "xlmr": "FacebookAI/xlm-roberta-base",
    "xlmr-large": "FacebookAI/xlm-roberta-large",
}
"""Short names for the usual multilingual encoders (hub ids)."""

TINY_BASES = ("tiny-bert", "tiny-xlmr")
"""Random-weight bases built in-process (for tests and the offline smoke demo)."""

PREPARED_BASES = ("e5-small", "e5-small-bible")
"""Real bases built offline by ``xlpeft prepare-base`` into the cache (no hub needed); the two e5-small bases
share the encoder and differ in the warm-up of the MLM head (UDHR samples vs the Bible text)."""


@dataclass(frozen=True)
class ArchSpec:
    """Where things live inside a masked-LM model of one architecture (dotted attribute paths)."""

    encoder: str  # the bare encoder (BertModel / XLMRobertaModel)
    layers: str  # ModuleList of transformer layers, relative to the MLM model
    attn_output: str  # attention output sub-layer (dense, dropout, LayerNorm), relative to a layer
    ffn_output: str  # FFN output sub-layer (dense, dropout, LayerNorm), relative to a layer
    mlm_head: str  # the MLM head taking hidden states (N, H) -> logits (N, V)
    dropout: str = "dropout"  # dropout inside a sub-layer output: the point where adapters act
    layer_norm: str = "LayerNorm"
    embeddings: str = "bert.embeddings"  # word + position + type embeddings, LayerNorm, dropout
    seq_head: tuple[str, str] = ("bert.pooler.dense", "classifier")  # (dense, output) of *ForSequenceClassification
    token_head: str = "classifier"  # output layer of *ForTokenClassification
    positions_after_padding: bool = False  # RoBERTa/XLM-R: position ids start at padding_idx + 1
    self_attention: str = "attention.self"  # self-attention (query, key, value Linear layers), relative to a layer
    query: str = "query"  # the projections, relative to the self-attention module (LoRA, (IA)³, prefix tuning)
    key: str = "key"
    value: str = "value"
    intermediate: str = "intermediate"  # FFN input sub-layer: dense + activation, (B, T, H) -> (B, T, I)


ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": ArchSpec("bert", "bert.encoder.layer", "attention.output", "output", "cls"),
    "xlm-roberta": ArchSpec("roberta", "roberta.encoder.layer", "attention.output", "output", "lm_head",
                            embeddings="roberta.embeddings", seq_head=("classifier.dense", "classifier.out_proj"),
                            positions_after_padding=True),
    "roberta": ArchSpec("roberta", "roberta.encoder.layer", "attention.output", "output", "lm_head",
                        embeddings="roberta.embeddings", seq_head=("classifier.dense", "classifier.out_proj"),
                        positions_after_padding=True),
}
"""One table of module paths per architecture; adding an architecture is adding a row."""


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def arch_for(model: nn.Module) -> ArchSpec:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise XlpeftError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}. "
            "Add a row to xlpeft.models.ARCHITECTURES for it."
        )
    return ARCHITECTURES[model_type]


def usable_positions(model: nn.Module) -> int:
    """Longest input, special tokens included, that the model's position table can embed.

    BERT: ``max_position_embeddings``. RoBERTa/XLM-R number positions from ``padding_idx + 1``
    (``create_position_ids_from_input_ids``), so ``max_position_embeddings - padding_idx - 1``:
    514 - 1 - 1 = 512 for XLM-R. The one place this limit is computed.
    """
    config = model.config
    limit = int(config.max_position_embeddings)
    if arch_for(model).positions_after_padding:
        limit -= int(config.pad_token_id) + 1
    return limit


def fit_seq_len(requested: int, model: nn.Module, explicit: bool, what: str = "max_seq_len") -> int:
    """``requested`` if the base can embed it; a default that does not fit is lowered to the limit.

    Raises:
        ConfigError: an explicitly chosen ``requested`` is longer than the base's usable positions.
    """
    from xlpeft.errors import ConfigError

    limit = usable_positions(model)
    if requested <= limit:
        return requested
    if explicit:
        raise ConfigError(
            f"{what}={requested} is longer than the base can embed: its position table has {limit} usable "
            f"positions (max_position_embeddings={model.config.max_position_embeddings}); "
            f"pass --set {what}={limit} or less"
        )
    return limit


@dataclass
class Base:
    """A frozen base encoder with its tokenizer and identity."""

    name: str  # what the user asked for (alias, hub id or path)
    path: Path  # local directory the weights came from
    model: nn.Module  # *ForMaskedLM, all parameters frozen
    tokenizer: object
    fingerprint: str
    arch: ArchSpec

    @property
    def encoder(self) -> nn.Module:
        return get_submodule(self.model, self.arch.encoder)

    @property
    def mlm_head(self) -> nn.Module:
        return get_submodule(self.model, self.arch.mlm_head)

    @property
    def layers(self) -> nn.ModuleList:
        return get_submodule(self.model, self.arch.layers)  # type: ignore[return-value]

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def cache_dir() -> Path:
    """Where prepared bases live: ``$XLPEFT_CACHE`` or ``~/.cache/xlpeft``."""
    root = os.environ.get("XLPEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "xlpeft")
    return Path(root)


_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def fingerprint_dir(path: Path) -> str:
    """Hash of the model config and every weight file: identifies the exact base weights.

    Volatile config keys (transformers version, the load path) are dropped so the same
    weights copied elsewhere or saved by another transformers version keep their identity.
    Hashing mBERT's weights takes seconds, so the result is memoised in the cache dir under
    the files' (name, size, mtime); any change to a file hashes it again.
    """
    weight_files = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not weight_files:
        raise XlpeftError(f"no weight files (*.safetensors, *.bin) in {path}; expected a Hugging Face model directory")
    files = [path / "config.json", *weight_files]
    stats = [(p, p.stat()) for p in files]
    stamp = [(str(p.resolve()), st.st_size, st.st_mtime_ns) for p, st in stats]
    memo = cache_dir() / "fingerprints" / hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32]
    try:
        cached = memo.read_text(encoding="utf-8").strip()
        if len(cached) == 16:
            return cached
    except OSError:
        pass
    h = hashlib.sha256()
    config = json.loads(files[0].read_text(encoding="utf-8"))
    for key in ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype"):
        config.pop(key, None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for p in weight_files:
        h.update(p.name.encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()[:16]
    try:  # a read-only cache only costs the hash next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest, encoding="utf-8")
    except OSError:
        pass
    return digest


def resolve_base_dir(name: str) -> Path:
    """Turn an alias, hub id or path into a local directory, downloading from the hub if reachable."""
    candidate = Path(os.path.expanduser(name))
    if candidate.is_dir():
        if not (candidate / "config.json").is_file():
            raise XlpeftError(f"{candidate} has no config.json; pass a Hugging Face model directory as --base")
        return candidate
    if name in TINY_BASES:
        target = cache_dir() / "bases" / name
        if not (target / "config.json").is_file():
            build_tiny_base(name, target)
        return target
    prepared = cache_dir() / "bases" / name
    if (prepared / "config.json").is_file():
        return prepared
    if name in PREPARED_BASES:
        raise XlpeftError(f"base {name!r} is not prepared yet; run `xlpeft prepare-base {name}` first")
    repo_id = ALIASES.get(name, name)
    if "/" not in repo_id and name not in ALIASES and (candidate.suffix or os.sep in name):
        raise XlpeftError(f"base {name!r} is not a directory; pass an existing model directory or a hub id")
    return _snapshot(repo_id, name)


def _snapshot(repo_id: str, name: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "tokenizer*", "sentencepiece*", "*.model", "special_tokens_map.json", "vocab*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
        except Exception as exc:  # network down, unknown repo, gated repo ...
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
    raise XlpeftError(
        f"base {name!r} ({repo_id}) is not in the local Hugging Face cache and could not be fetched ({reason}); "
        "pass a local model directory with --base PATH"
    )


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def load_base(name: str, device: str | torch.device = "cpu") -> Base:
    """Load a masked-LM base by alias, hub id or directory, frozen, with its fingerprint.

    Args:
        name: ``mbert``, ``xlmr``, ``xlmr-large``, ``tiny-bert``, ``tiny-xlmr``, a hub id or a local directory.
        device: where to place the model.

    Raises:
        XlpeftError: the base cannot be found, or its architecture is not in :data:`ARCHITECTURES`.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_base_dir(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated or corrupted weight file
        raise XlpeftError(f"could not load base from {path}: {(str(exc).splitlines() or [type(exc).__name__])[0]}; "
                          "if it is a cached or downloaded base, delete that directory and prepare it again") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    arch = arch_for(model)
    missing_head = [k for k in info.get("missing_keys", []) if k.startswith(arch.mlm_head)]
    if missing_head:
        warnings.warn(
            f"base {name!r} has no trained MLM head ({len(missing_head)} head tensors initialised at random); "
            "warm one up first: xlpeft warm-head --base DIR --output DIR",
            stacklevel=2,
        )
    freeze(model)
    model.to(device)
    return Base(name=name, path=path, model=model, tokenizer=tokenizer, fingerprint=fingerprint_dir(path), arch=arch)


def build_tiny_base(kind: str, out_dir: Path, texts: Iterable[str] | None = None, vocab_size: int = 512) -> Path:
    """Write a tiny random-weight BERT or XLM-R masked-LM with an in-process trained tokenizer.

    Used by the tests and the offline smoke demo: no hub, no downloads. BERT gets a
    WordPiece tokenizer, XLM-R a Unigram (sentencepiece-style) one, as their real
    counterparts do.
    """
    from transformers import BertConfig, BertForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM

    if kind not in TINY_BASES:
        raise XlpeftError(f"unknown tiny base {kind!r}; expected one of {', '.join(TINY_BASES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = list(texts) if texts is not None else _builtin_texts()
    tokenizer = _train_tokenizer(kind, texts, vocab_size)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512 + 2, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)  # the same tiny base on every machine
    if kind == "tiny-bert":
        model = BertForMaskedLM(BertConfig(**common))
    else:
        model = XLMRobertaForMaskedLM(XLMRobertaConfig(bos_token_id=0, eos_token_id=2, **common))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    hf_logging.enable_progress_bar()
    return out_dir


def _train_tokenizer(kind: str, texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "tiny-bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(_wordpiece_vocab(texts, vocab_size, specials), unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        cls_token="<s>", sep_token="</s>", mask_token="<mask>",
    )


def _wordpiece_vocab(texts: list[str], vocab_size: int, specials: list[str]) -> dict[str, int]:
    """A WordPiece vocabulary learned deterministically, so a tiny BERT is the same on every run and machine.

    The tokenizers library's WordPiece trainer breaks ties between equally frequent merges in hash
    order: the same texts gave another vocabulary (and so another vocabulary size and other random
    weights) on each call. Its Unigram trainer is deterministic, so the Unigram pieces of
    BERT-pre-tokenized words become WordPiece entries, each both word-initial and as ``##piece``,
    with every character in both forms so that no word of the texts falls back to ``[UNK]``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.BertNormalizer(lowercase=False)
    unigram.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Metaspace()])
    unigram.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                              unk_token="[UNK]", show_progress=False))
    pieces = [p.removeprefix("\u2581") for p, _ in sorted(unigram.get_vocab().items(), key=lambda item: item[1])
              if p not in specials]
    chars = sorted({c for text in texts for c in normalizers.BertNormalizer(lowercase=False).normalize_str(text)
                    if not c.isspace()})
    entries = [*specials, *chars, *(f"##{c}" for c in chars)]
    entries += [form for piece in pieces if piece for form in (piece, f"##{piece}")]
    return {token: i for i, token in enumerate(dict.fromkeys(entries))}


def _builtin_texts() -> list[str]:
    """A few sentences in several languages so a tiny tokenizer covers the demo packs' scripts."""
    sample = Path(__file__).resolve().parent.parent / "language_packs"
    texts: list[str] = []
    if sample.is_dir():
        for f in sorted(sample.glob("*/*.txt")):
            texts.extend(f.read_text(encoding="utf-8").splitlines()[:400])
    texts.extend(
        [
            "All human beings are born free and equal in dignity and rights.",
            "Watu wote wamezaliwa huru, hadhi na haki zao ni sawa.",
            "Barack Obama visited Nairobi in July .",
            "Rais Kenyatta alikutana na wajumbe wa Umoja wa Mataifa jijini Dodoma .",
        ]
        * 4
    )
    return texts
