"""Frozen, validated configuration dataclasses and the ``--set key=value`` override mechanism.

Every hyper-parameter lives in a frozen dataclass whose fields carry ``help`` (and, for
closed sets, ``choices``) metadata. ``__post_init__`` validates ranges and gathers *all*
problems into one :class:`ConfigError`, so a user fixes a command line in one go.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from xlpeft.errors import ConfigError

DEFAULT_BASE = "xlmr"
"""The base of every command and request that takes one (``--base``)."""
DEFAULT_METHOD = "adapter"
"""The method of ``train-lang`` / ``train-task`` when ``--method`` is not given (MAD-X)."""


def check_fields(obj: Any, extra: Iterable[str] = ()) -> None:
    """Validate ``choices``/``min``/``max`` metadata of a dataclass instance; raise all problems at once.

    ``extra``: problems the caller found itself, reported in the same error.
    """
    problems = list(extra)
    for f in fields(obj):
        value = getattr(obj, f.name)
        meta = f.metadata
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every < and > check
            problems.append(f"`{f.name}` should be a finite number; got {value!r}")
            continue
        if "choices" in meta and value not in meta["choices"]:
            problems.append(f"`{f.name}` should be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
        if "min" in meta and value < meta["min"]:
            problems.append(f"`{f.name}` should be >= {meta['min']}; got {value!r}")
        if "max" in meta and value > meta["max"]:
            problems.append(f"`{f.name}` should be <= {meta['max']}; got {value!r}")
        if "gt" in meta and value <= meta["gt"]:
            problems.append(f"`{f.name}` should be > {meta['gt']}; got {value!r}")
    if problems:
        raise ConfigError(f"invalid {type(obj).__name__}: " + "; ".join(problems))


def _base_type(annotation: Any) -> tuple[type, bool]:
    """Return (scalar type, optional?) for annotations like ``int``, ``float | None``, ``str``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def coerce(cls: type, key: str, raw: Any) -> Any:
    """Convert a raw override (usually a string from ``--set``) to the type of field ``key`` of ``cls``."""
    hints = typing.get_type_hints(cls)
    target, optional = _base_type(hints[key])
    if not isinstance(raw, str):
        if target is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        return raw
    text = raw.strip()
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if target is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if target is int:
            if "e" in text.lower() and "x" not in text.lower() and float(text).is_integer():
                return int(float(text))
            return int(text)
        if target is float:
            return float(text)
    except (ValueError, OverflowError):
        article = "an" if target.__name__[0] in "aeiou" else "a"
        raise ConfigError(f"`{key}` should be {article} {target.__name__}; got {_brief(raw)}") from None
    if target is str and not text:
        raise ConfigError(f"`{key}` is empty; give it a value (see `xlpeft methods` for what it accepts)")
    return text


def _brief(raw: str, limit: int = 80) -> str:
    return repr(raw) if len(raw) <= limit else f"{raw[:limit]!r}... ({len(raw)} characters)"


def parse_sets(pairs: Iterable[str]) -> dict[str, str]:
    """Parse repeated ``key=value`` strings into a dict; a pair without ``=`` is an error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {_brief(pair)}; e.g. --set lr=1e-4")
        out[key.strip()] = value.strip()
    return out


def merge_flags(sets: Mapping[str, str], **flags: Any) -> dict[str, str]:
    """``--set`` pairs with the CLI's shorthand flags (``--max-steps``...) folded in: one route per setting.

    Raises:
        ConfigError: a flag and a ``--set`` of the same key disagree.
    """
    out = dict(sets)
    for key, value in flags.items():
        if value is None:
            continue
        if key in out and out[key] != str(value):
            raise ConfigError(f"--{key.replace('_', '-')} {value} and --set {key}={out[key]} both set `{key}`; give one")
        out[key] = str(value)
    return out


def default_of(cls: type, name: str) -> Any:
    """The declared default of field ``name`` of dataclass ``cls`` (for help texts: defaults live in one place)."""
    for f in fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.init]


def split_overrides(overrides: Mapping[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Route each override to the first dataclass that has the key; unknown keys list the accepted ones."""
    routed: list[dict[str, Any]] = [{} for _ in classes]
    unknown = []
    for key, value in overrides.items():
        for i, cls in enumerate(classes):
            if key in field_names(cls):
                routed[i][key] = coerce(cls, key, value)
                break
        else:
            unknown.append(key)
    if unknown:
        accepted = sorted({name for cls in classes for name in field_names(cls)})
        raise ConfigError(
            f"unknown --set key(s) {', '.join(map(repr, unknown))}; accepted keys: {', '.join(accepted)}"
        )
    return routed


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """Instantiate ``cls`` from a mapping, rejecting unknown keys by name (for manifests and YAML)."""
    unknown = set(values) - set(field_names(cls))
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} key(s) {sorted(unknown)}; accepted keys: {', '.join(field_names(cls))}"
        )
    return cls(**{k: coerce(cls, k, v) for k, v in values.items()})


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data settings shared by every training command."""

    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (MAD-X: 1e-4)", "gt": 0})
    batch_size: int = field(default=8, metadata={"help": "sequences per optimizer step (before accumulation)", "min": 1})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per optimizer step", "min": 1})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps (MAD-X language adapters: 250k)", "min": 1})
    warmup_ratio: float = field(default=0.06, metadata={"help": "fraction of steps of linear warm-up", "min": 0.0, "max": 1.0})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "min": 0.0})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)", "min": 0.0})
    max_seq_len: int = field(default=256, metadata={"help": "tokens per packed MLM block", "min": 8})
    mlm_probability: float = field(default=0.15, metadata={"help": "fraction of tokens selected for MLM", "gt": 0.0, "max": 1.0})
    eval_fraction: float = field(default=0.05, metadata={"help": "held-out fraction of blocks for eval loss", "gt": 0.0, "max": 0.5})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0: only at the end)", "min": 0})
    eval_batches: int = field(default=50, metadata={"help": "at most this many eval batches (MLM blocks, or task "
                                                            "examples, of batch_size each)", "min": 1})
    eval_tokens: int = field(default=0, metadata={"help": "held-out tokens per MLM evaluation (0: a fifth of the "
                                                          "run's training tokens, at least 4 batches; at most "
                                                          "eval_batches batches either way)", "min": 0})
    log_every: int = field(default=10, metadata={"help": "log training metrics every N steps", "min": 1})
    max_corpus_lines: int = field(default=0, metadata={"help": "read at most N corpus lines (0: all)", "min": 0})
    new_tokens: int = field(default=0, metadata={
        "help": "language modules: add the N most frequent corpus words the base tokenizer splits into pieces as new "
                "whole-word tokens, their embeddings trained with the module (0: none; see xlpeft coverage)", "min": 0})
    new_token_min_count: int = field(default=3, metadata={
        "help": "a new token's word must occur at least this often in the first 200,000 corpus lines", "min": 1})
    new_token_unit: str = field(default="word", metadata={
        "help": "what new_tokens adds: word (whole words the base splits, for space-separated scripts) or piece "
                "(sub-word pieces of a model of the base's kind trained on the corpus, for scripts written without "
                "spaces: km, th, lo, my)", "choices": ("word", "piece")})
    corpus_mode: str = field(default="auto", metadata={
        "help": "language modules: cache (tokenise once into $XLPEFT_CACHE/tokens, shuffle globally), stream "
                "(tokenise ahead of the loop, only what is consumed; a shuffle buffer) or auto (stream hf: corpora, "
                "cache files)", "choices": ("auto", "cache", "stream")})
    stream_buffer: int = field(default=2048, metadata={"help": "blocks in the shuffle buffer of corpus_mode=stream",
                                                       "min": 1})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "keep only each encoder layer's input and recompute the layer in the backward pass (Chen et al. "
                "2016): the activations of one layer instead of all, for about one more forward pass per step"})
    checkpoint_every: int = field(default=500, metadata={"help": "write a resumable checkpoint every N steps (0: never)", "min": 0})
    seed: int = field(default=42, metadata={"help": "seed for initialisation, masking and data order",
                                            "min": 0, "max": 2**32 - 1})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16",
                                                     "choices": ("auto", "fp32", "bf16")})

    def __post_init__(self) -> None:
        check_fields(self, extra=device_problems(self.device))


KIND_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "language": {},
    "task": {"max_seq_len": 128, "eval_fraction": 0.1},  # MAD-X trains NER/POS at 128 sub-words; a 10% held-out slice
}
"""TrainConfig defaults per module kind, over the dataclass's own (which are the language modules')."""


DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?|mps")


def device_problems(name: str) -> list[str]:
    """``device`` is auto, cpu, cuda, cuda:N or mps, and present in this torch build; else what is wrong."""
    if not DEVICE.fullmatch(name):
        return [f"`device` should be auto, cpu, cuda, cuda:N or mps; got {_brief(name)}"]
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            return [f"`device` is {name} but this torch ({torch.__version__}, {build}) sees no CUDA device; "
                    "use device=cpu or device=auto, or install a CUDA build of torch"]
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            return [f"`device` is {name} but only {torch.cuda.device_count()} CUDA device(s) are visible"]
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return ["`device` is mps but this machine has no MPS device; use device=cpu or device=auto"]
    return []
