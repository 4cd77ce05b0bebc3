"""Hugging Face peft (0.21) <-> xlpeft: LoRA / DoRA and (IA)³ adapters as ``adapter_config.json`` + ``adapter_model.safetensors``.

    xlpeft convert ./peft-lora modules/lang-sw-lora --from peft --base xlmr
    xlpeft convert modules/lang-sw-lora ./peft-out --from xlpeft --to peft

What maps (checked against peft 0.21.2, ``tuners/lora/layer.py``, ``tuners/lora/dora.py``, ``tuners/ia3/layer.py``):

* ``LORA``: ``<prefix>.<i>.<linear path>.lora_A.weight`` (r, in) / ``lora_B.weight`` (out, r) ->
  xlpeft ``layers.<i>.<site>.lora_A`` / ``lora_B``; ``lora_alpha`` -> ``alpha``, ``lora_dropout`` ->
  ``dropout``; ``use_dora`` with ``lora_magnitude_vector`` (out,) -> ``magnitude``; the sites and layers
  present in the weights give ``target_modules`` and ``layers``.
* ``IA3``: ``ia3_l`` on ``attention.self.key`` / ``value`` (out, 1) -> ``layers.<i>.key`` / ``value``; on the
  FFN output Linear as a feed-forward module (1, intermediate), which rescales its input, the FFN
  intermediate activation -> ``layers.<i>.intermediate``.

Keys are accepted with or without ``base_model.model.``, with or without peft's ``.default`` adapter
name, and on the masked-LM/task model (``bert.encoder.layer``) or the bare encoder (``encoder.layer``).
Refused by name: other peft types, ``modules_to_save``, ``bias`` other than ``none``, ``rank_pattern`` /
``alpha_pattern``, rsLoRA, ``fan_in_fan_out``, LoRA biases, layer replication, trainable tokens,
targets xlpeft has no site for (peft's default (IA)³ targets for BERT scale ``attention.output.dense``
too, which Liu et al. 2022 do not). An import keeps peft's config and key prefix
(``extra.imported``), so an export writes the same files back.

The per-type readers and writers are one table, :data:`PEFT_TYPES`, keyed by ``peft_type``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from xlpeft.config import build
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.interop.peft_prompts import read_prefix, read_prompt, write_prefix, write_prompt
from xlpeft.io import MANIFEST, Manifest, install_dir, load_module, save_module
from xlpeft.methods.ia3 import IA3_SITES, IA3Config
from xlpeft.methods.lora import LoraConfig, layer_linears, parse_layers, parse_targets
from xlpeft.models import ARCHITECTURES, ArchSpec, get_submodule

CONFIG_FILE = "adapter_config.json"
WEIGHTS_SAFE = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"


@dataclass
class Skeleton:
    """What a converter needs of the base: its manifest record, architecture, depth and a layer's Linear paths."""

    base_ref: dict[str, str]
    arch: ArchSpec
    num_layers: int
    linears: dict[str, tuple[str, torch.nn.Linear]]  # site -> (path relative to a layer, the Linear: shapes only)

    def site_of(self, path: str) -> str | None:
        return next((site for site, (p, _) in self.linears.items() if p == path), None)


def skeleton(base: Any) -> Skeleton:
    """The :class:`Skeleton` of a loaded Base, or of a base by name/directory built on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    from xlpeft.models import arch_for, fingerprint_dir, resolve_base_dir

    if hasattr(base, "fingerprint"):
        model, ref = base.model, {"name": base.name, "fingerprint": base.fingerprint,
                                  "model_type": base.model.config.model_type}
    else:
        path = resolve_base_dir(str(base))
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForMaskedLM.from_config(config)
        ref = {"name": str(base), "fingerprint": fingerprint_dir(path), "model_type": config.model_type}
    arch = arch_for(model)
    layers = get_submodule(model, arch.layers)
    return Skeleton(ref, arch, len(layers), layer_linears(layers[0], arch))


# ---- keys

def split_key(key: str, arch: ArchSpec) -> tuple[str, int, str, str] | None:
    """``base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.default.weight`` ->
    (prefix before the layer index, 3, ``attention.self.query``, ``lora_A.weight``); None for a key outside the layers."""
    container = arch.layers.removeprefix(arch.encoder + ".")  # encoder.layer
    bare = key.replace(".default.", ".").removesuffix(".default")
    m = re.fullmatch(rf"(?P<prefix>(?:base_model\.model\.)?(?:{re.escape(arch.encoder)}\.)?{re.escape(container)})"
                     r"\.(?P<i>\d+)\.(?P<rest>.+)", bare)
    if m is None:
        return None
    rest = m.group("rest")
    for leaf in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector.weight", "lora_magnitude_vector", "ia3_l"):
        if rest.endswith("." + leaf):
            return m.group("prefix"), int(m.group("i")), rest[: -len(leaf) - 1], leaf.removesuffix(".weight")
    return m.group("prefix"), int(m.group("i")), rest, ""


def group_weights(tensors: Mapping[str, torch.Tensor], skel: Skeleton, src: Path) -> tuple[str, dict]:
    """(key prefix, {(layer, site): {leaf: tensor}}) of a peft state dict; keys xlpeft cannot place are refused."""
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    prefixes, stray = set(), []
    for key, tensor in tensors.items():
        parts = split_key(key, skel.arch)
        site = skel.site_of(parts[2]) if parts else None
        if parts is None or site is None or not parts[3] or parts[1] >= skel.num_layers:
            stray.append(key)
            continue
        prefixes.add(parts[0])
        grouped.setdefault((parts[1], site), {})[parts[3]] = tensor
    if stray:
        raise XlpeftError(f"{src}: weights xlpeft has no place for on a {skel.base_ref['model_type']} base with "
                          f"{skel.num_layers} layers (sites: {', '.join(p for p, _ in skel.linears.values())}): "
                          f"{', '.join(sorted(stray)[:4])}")
    if len(prefixes) != 1:
        raise XlpeftError(f"{src}: weights under {len(prefixes)} key prefixes ({', '.join(sorted(prefixes)) or 'none'}); "
                          "expected one adapter of one model")
    return prefixes.pop(), grouped


def layers_field(layers: set[int], num_layers: int) -> str | None:
    return None if layers == set(range(num_layers)) else ",".join(map(str, sorted(layers)))


def check_product(grouped: Mapping[tuple[int, str], Any], src: Path) -> tuple[set[int], set[str]]:
    """The layers and sites of the weights; xlpeft modules hold every chosen site in every chosen layer."""
    layers, sites = {i for i, _ in grouped}, {s for _, s in grouped}
    missing = sorted((i, s) for i in layers for s in sites if (i, s) not in grouped)
    if missing:
        raise XlpeftError(f"{src}: adapted (layer, site) pairs are not every chosen site in every chosen layer "
                          f"(missing {missing[:4]}); xlpeft modules cannot hold that pattern")
    return layers, sites


def refuse(config: Mapping[str, Any], src: Path, falsy: tuple[str, ...], equal: Mapping[str, Any]) -> None:
    """Refuse peft options xlpeft does not implement, naming each field and its value."""
    bad = [f"{k}={config[k]!r}" for k in falsy if config.get(k)]
    bad += [f"{k}={config[k]!r} (xlpeft supports {v!r})" for k, v in equal.items() if k in config and config[k] != v]
    if bad:
        raise XlpeftError(f"{src}: peft options xlpeft does not support: {'; '.join(bad)}; train without them")


# ---- LORA

LORA_UNSUPPORTED = ("modules_to_save", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "lora_bias",
                    "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora",
                    "alora_invocation_tokens", "arrow_config", "use_bdlora", "megatron_config")


def read_lora(config: dict, tensors: Mapping[str, torch.Tensor], skel: Skeleton, src: Path):
    """peft LORA -> (LoraConfig, {"lora": state}, key prefix)."""
    refuse(config, src, LORA_UNSUPPORTED, {"bias": "none"})
    prefix, grouped = group_weights(tensors, skel, src)
    layers, sites = check_product(grouped, src)
    dora = bool(config.get("use_dora"))
    state: dict[str, torch.Tensor] = {}
    for (i, site), parts in sorted(grouped.items()):
        want = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if dora else set())
        if set(parts) != want:
            raise XlpeftError(f"{src}: layer {i} {site} holds {sorted(parts)}; expected {sorted(want)} "
                              f"(use_dora={dora})")
        state[f"layers.{i}.{site}.lora_A"] = parts["lora_A"]
        state[f"layers.{i}.{site}.lora_B"] = parts["lora_B"]
        if dora:
            state[f"layers.{i}.{site}.magnitude"] = parts["lora_magnitude_vector"].reshape(-1)
    ranks = {t.shape[0] for k, t in state.items() if k.endswith("lora_A")}
    if ranks != {int(config.get("r", 8))}:
        raise XlpeftError(f"{src}: adapter_config.json says r={config.get('r')} but lora_A has rank(s) {sorted(ranks)}")
    try:
        cfg = LoraConfig(r=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
                         dropout=float(config.get("lora_dropout") or 0.0),
                         target_modules=",".join(s for s in skel.linears if s in sites),
                         layers=layers_field(layers, skel.num_layers), use_dora=dora)
    except ConfigError as exc:
        raise XlpeftError(f"{src}: {exc}") from None
    return cfg, {"lora": state}, prefix


def write_lora(module, skel: Skeleton, prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """xlpeft lora module -> (peft adapter_config, adapter_model tensors)."""
    cfg = build(LoraConfig, module.manifest.config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in module.tensors["lora"].items():
        _, i, site, leaf = key.split(".")
        path = skel.linears[site][0]
        name = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}[leaf]
        out[f"{prefix}.{i}.{path}.{name}"] = tensor
    sites = [s for s in parse_targets(cfg.target_modules) if s in skel.linears]
    config = {"peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
              "target_modules": target_regex(skel, sites, cfg.layers), "use_dora": cfg.use_dora, "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False}
    return config, out


def target_regex(skel: Skeleton, sites: list[str], layers: str | None) -> str:
    """A peft ``target_modules`` regex (``re.fullmatch`` on module names) naming exactly these Linears."""
    container = re.escape(skel.arch.layers.removeprefix(skel.arch.encoder + "."))
    chosen = parse_layers(layers)
    index = r"\d+" if chosen is None else "(?:" + "|".join(map(str, chosen)) + ")"
    paths = "|".join(re.escape(skel.linears[s][0]) for s in sites)
    return rf".*{container}\.{index}\.(?:{paths})"


# ---- IA3

def read_ia3(config: dict, tensors: Mapping[str, torch.Tensor], skel: Skeleton, src: Path):
    """peft IA3 -> (IA3Config, {"ia3": state}, key prefix): keys and values rescaled, and the FFN output's input."""
    refuse(config, src, ("modules_to_save", "fan_in_fan_out"), {})
    prefix, grouped = group_weights(tensors, skel, src)
    placed = {"key": ("key", False), "value": ("value", False), "ffn_output": ("intermediate", True)}
    state: dict[str, torch.Tensor] = {}
    for (i, site), parts in sorted(grouped.items()):
        vector = parts.get("ia3_l")
        feedforward = vector is not None and vector.dim() == 2 and vector.shape[0] == 1
        if site not in placed or vector is None or placed[site][1] != feedforward or len(parts) != 1:
            what = "a feed-forward (input) scale" if feedforward else "an output scale"
            raise XlpeftError(f"{src}: (IA)³ vector on layer {i} {skel.linears[site][0]} as {what}: xlpeft's (IA)³ "
                              "(Liu et al. 2022) rescales key and value outputs and the FFN intermediate (the input of "
                              f"{skel.linears['ffn_output'][0]} as a feedforward module) only")
        state[f"layers.{i}.{placed[site][0]}"] = vector.reshape(-1)
    layers, sites = check_product({(int(k.split('.')[1]), k.split('.')[2]): 1 for k in state}, src)
    if layers != set(range(skel.num_layers)):
        raise XlpeftError(f"{src}: (IA)³ vectors on layers {sorted(layers)} of {skel.num_layers}; xlpeft's (IA)³ "
                          "covers every layer")
    return IA3Config(target_modules=",".join(s for s in IA3_SITES if s in sites)), {"ia3": state}, prefix


def write_ia3(module, skel: Skeleton, prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """xlpeft ia3 module -> (peft adapter_config, adapter_model tensors)."""
    cfg = build(IA3Config, module.manifest.config)
    where = {"key": ("key", False), "value": ("value", False), "intermediate": ("ffn_output", True)}
    out: dict[str, torch.Tensor] = {}
    for key, vector in module.tensors["ia3"].items():
        _, i, site = key.split(".")
        linear, feedforward = where[site]
        out[f"{prefix}.{i}.{skel.linears[linear][0]}.ia3_l"] = vector.reshape(1, -1) if feedforward else vector.reshape(-1, 1)
    sites = [where[s][0] for s in cfg.sites]
    config = {"peft_type": "IA3", "target_modules": target_regex(skel, sites, None),
              "feedforward_modules": target_regex(skel, ["ffn_output"], None) if "intermediate" in cfg.sites else [],
              "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None}
    return config, out


# ---- the table

@dataclass(frozen=True)
class PeftType:
    """One peft adapter type: the xlpeft method it maps to, a reader and a writer.

    ``read(config, tensors, skeleton, src) -> (method config, {stem: state}, key prefix)``;
    ``write(loaded module, skeleton, key prefix) -> (adapter_config dict, adapter_model tensors)``;
    ``exports(loaded module) -> bool``: whether this row writes that module, when several rows share a
    method (prefix tuning and prompt tuning are both xlpeft ``prefix`` modules).
    """

    method: str
    read: Callable[..., tuple[Any, dict[str, dict[str, torch.Tensor]], str]]
    write: Callable[..., tuple[dict, dict[str, torch.Tensor]]]
    exports: Callable[[Any], bool] = lambda module: True


PEFT_TYPES: dict[str, PeftType] = {
    "LORA": PeftType("lora", read_lora, write_lora),
    "IA3": PeftType("ia3", read_ia3, write_ia3),
    "PREFIX_TUNING": PeftType("prefix", read_prefix, write_prefix),  # xlpeft/interop/peft_prompts.py
    "PROMPT_TUNING": PeftType("prefix", read_prompt, write_prompt),  # export: write_prefix writes layers=input as this
}
"""peft_type -> converter. To add a type (e.g. ``PREFIX_TUNING`` in ``xlpeft/interop/peft_prompts.py``), write its
``read``/``write`` with the signatures of :class:`PeftType` and add one row here; import and export find it by
``peft_type`` (import) or by the module's method (export)."""


def import_peft(src: str | Path, dst: str | Path, base: Any, name: str | None = None) -> Path:
    """Convert a peft adapter directory into an xlpeft language module at ``dst``, checked against ``base``.

    Raises:
        XlpeftError: a peft type or option xlpeft does not support (named), or weights that do not fit the base.
    """
    from xlpeft.interop import check_output_dir, read_json_object, read_state_dict
    from xlpeft.registry import get_method

    src, dst = Path(src), check_output_dir(dst, MANIFEST)
    if not (src / CONFIG_FILE).is_file():
        raise XlpeftError(f"{src} has no {CONFIG_FILE}; is it a peft adapter directory (save_pretrained)?")
    config = read_json_object(src / CONFIG_FILE, "; is it a peft adapter directory?")
    kind = config.get("peft_type")
    if kind not in PEFT_TYPES:
        raise XlpeftError(f"{src}: peft_type {kind!r} is not supported; supported: {', '.join(PEFT_TYPES)}")
    skel = skeleton(base)
    converter = PEFT_TYPES[kind]
    method_cfg, tensors, prefix = converter.read(config, read_state_dict(src, WEIGHTS_SAFE, WEIGHTS_BIN, "is it a complete peft adapter?"), skel, src)
    label = name or src.name
    manifest = Manifest(kind="language", method=converter.method, base=skel.base_ref, config=asdict(method_cfg),
                        lang=label, trainable_parameters=sum(t.numel() for s in tensors.values() for t in s.values()),
                        extra={"imported": {"format": "peft", "source": str(src), "config": config, "prefix": prefix}})
    if hasattr(base, "fingerprint"):  # the weights must fit the base: apply once and take it off again
        get_method(converter.method).apply(base, _Loaded(manifest, tensors, dst)).remove()
    return save_module(dst, manifest, tensors)


@dataclass
class _Loaded:
    manifest: Manifest
    tensors: dict[str, dict[str, torch.Tensor]]
    path: Path


def export_peft(src: str | Path, dst: str | Path, base: Any = None, without_head: bool = False) -> Path:
    """Write an xlpeft lora / ia3 module as a peft adapter directory that ``PeftModel.from_pretrained`` loads.

    Args:
        src: the xlpeft module directory.
        dst: the directory to write (replaced if it is an earlier peft export).
        base: the base (for its layer layout) [default: the base the module's manifest names].
        without_head: export a task module's adapter without its head (peft keeps heads as modules_to_save).

    Raises:
        XlpeftError: a method peft has no type for here, or a task module without ``without_head``.
    """
    from xlpeft.interop import check_output_dir

    dst = check_output_dir(dst, CONFIG_FILE)
    module = load_module(src)
    m = module.manifest
    kind = next((k for k, t in PEFT_TYPES.items() if t.method == m.method and t.exports(module)), None)
    if kind is None:
        methods = ", ".join(t.method for t in PEFT_TYPES.values())
        raise XlpeftError(f"{src} is a {m.method!r} module; peft export takes {methods} modules")
    if m.kind == "task" and not without_head:
        raise XlpeftError(f"{src} is a task module with a head, which peft would keep as modules_to_save; pass "
                          "--without-head to export the adapter alone")
    if m.base.get("model_type") not in ARCHITECTURES:
        raise XlpeftError(f"{src}: base model type {m.base.get('model_type')!r} is not one of {', '.join(ARCHITECTURES)}")
    skel = skeleton(base if base is not None else m.base["name"])
    imported = m.extra.get("imported") or {}
    from_peft = imported.get("format") == "peft"
    prefix = imported["prefix"] if from_peft else f"base_model.model.{skel.arch.layers}"
    config, tensors = PEFT_TYPES[kind].write(module, skel, prefix)
    if from_peft and imported.get("config", {}).get("peft_type") == kind:
        config = imported["config"]  # written back as read: a round trip gives peft's own file
    else:
        config = {**config, "task_type": None, "inference_mode": True, "base_model_name_or_path": m.base.get("name"),
                  "revision": None}
    tmp = Path(tempfile.mkdtemp(prefix=".peft-export-", dir=dst.parent if dst.parent.exists() else None))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_SAFE), metadata={"format": "pt"})
        return install_dir(tmp, dst, CONFIG_FILE, "a peft adapter directory")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["PEFT_TYPES", "PeftType", "export_peft", "import_peft", "skeleton", "split_key"]
