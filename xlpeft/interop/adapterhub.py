"""AdapterHub (``adapters`` 1.x) bottleneck adapters <-> xlpeft adapter modules.

An AdapterHub adapter directory holds ``adapter_config.json`` (``{"config": {...BnConfig...},
"name", "model_type", "hidden_size", "version", ...}``), the weights as ``pytorch_adapter.bin``
(or ``adapter.safetensors``), and optionally ``head_config.json`` + ``pytorch_model_head.bin``.

What maps, checked against ``adapters`` 1.3.0 (``methods/modeling.py``: ``Adapter``,
``NICECouplingBlock``; ``configuration/adapter_config.py``):

* ``seq_bn`` (Pfeiffer): after the FFN only, ``original_ln_before`` and ``residual_before_ln``:
  ``h <- h + A(LN(h + x))`` then ``LN(h + x)``: xlpeft's ``pfeiffer`` placement.
* ``double_seq_bn`` (Houlsby): after attention and FFN, ``original_ln_before=False``:
  ``h <- h + A(h)`` then ``LN(h + x)``: xlpeft's ``houlsby`` placement.
* ``*_inv``: a NICE coupling block, ``y1 = x1 + F(x2); y2 = x2 + G(y1)``, F and G two-layer MLPs
  of width ``int((H/2) // inv_adapter_reduction_factor)`` with the adapter's non-linearity: xlpeft's
  :class:`~xlpeft.methods.invertible.InvertibleAdapter`. Weights ``F.0``/``F.2`` are ``F.down``/``F.up``.
* exact extras: a constant ``scaling`` is folded into the up-projection (and unfolded on export),
  ``leave_out`` layers get zero weights (the identity), ``dropout``/``stochastic_depth``/``init_*``
  only act in training.

Refused by name: other methods (LoRA, prefix tuning, ...), parallel/gated/PHM adapters, new
layer norms (``ln_before``/``ln_after``), ``residual_before_ln`` other than as in the presets,
GLOW invertible blocks, non-linearities xlpeft lacks (e.g. ``gelu_new``).

Known gap: AdapterHub applies the invertible adapter to the output of the whole embedding layer;
xlpeft's ``attach_adapters`` (at the time of writing) applies it to the word-embedding lookup. The
weights convert exactly, but composing an invertible adapter gives other logits than AdapterHub
until that hook moves (see tests/interop/fixtures/README.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from xlpeft.errors import XlpeftError
from xlpeft.interop import check_output_dir, load_pickled
from xlpeft.io import MANIFEST, Manifest, load_module, save_module
from xlpeft.methods.adapters import AdapterConfig, AdapterModule
from xlpeft.methods.bottleneck import ACTIVATIONS

CONFIG_FILE, WEIGHTS_BIN, WEIGHTS_SAFE = "adapter_config.json", "pytorch_adapter.bin", "adapter.safetensors"
HEAD_CONFIG_FILE, HEAD_BIN, HEAD_SAFE = "head_config.json", "pytorch_model_head.bin", "model_head.safetensors"
WRITES_VERSION = "adapters.1.3.0"  # the config format written; its presence also stops pre-v1 activation renaming

_BN_DEFAULTS: dict[str, Any] = {  # BnConfig's fields and defaults in adapters 1.3.0, as save_adapter writes them
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": False, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}
_SEQ = {"original_ln_before": True, "mh_adapter": False, "non_linearity": "relu"}
_DOUBLE = {"original_ln_before": False, "mh_adapter": True, "non_linearity": "swish"}
_NICE = {"inv_adapter": "nice", "inv_adapter_reduction_factor": 2}
PRESETS: dict[str, dict[str, Any]] = {
    "seq_bn": {**_BN_DEFAULTS, **_SEQ},
    "seq_bn_inv": {**_BN_DEFAULTS, **_SEQ, **_NICE},
    "double_seq_bn": {**_BN_DEFAULTS, **_DOUBLE},
    "double_seq_bn_inv": {**_BN_DEFAULTS, **_DOUBLE, **_NICE},
}
"""The four bottleneck configs xlpeft reads and writes, as full adapters-1.3.0 config dicts."""
_PRESET_ALIASES = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "pfeiffer+inv": "seq_bn_inv",
                   "houlsby+inv": "double_seq_bn_inv"}
_OLD_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # configs saved before "version" existed
_MODEL_CLASSES = {"bert": "BertAdapterModel", "xlm-roberta": "XLMRobertaAdapterModel", "roberta": "RobertaAdapterModel"}
_PREFIXES = {"bert": "bert", "xlm-roberta": "roberta", "roberta": "roberta"}

_LAYER_KEY = re.compile(
    r"^(?:(?P<prefix>\w+)\.)?encoder\.layer\.(?P<layer>\d+)\.(?P<site>attention\.output|output)\.adapters\."
    r"(?P<name>[^.]+)\.(?P<part>adapter_down\.0|adapter_up)\.(?P<kind>weight|bias)$"
)
_INV_KEY = re.compile(
    r"^(?:(?P<prefix>\w+)\.)?invertible_adapters\.(?P<name>[^.]+)\.(?P<block>[FG])\.(?P<part>[02])\.(?P<kind>weight|bias)$"
)
_HEAD_KEY = re.compile(r"^heads\.(?P<name>[^.]+)\.(?P<index>\d+)\.(?P<kind>weight|bias)$")
_SITES = {"attention.output": "attn", "output": "ffn"}
_PARTS = {"adapter_down.0": "down", "adapter_up": "up", "0": "down", "2": "up"}


# ---------------------------------------------------------------- reading
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XlpeftError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise XlpeftError(f"{path} should hold a JSON object; got {type(data).__name__}")
    return data


def _read_weights(src: Path, safe_name: str, bin_name: str) -> dict[str, torch.Tensor]:
    if (src / safe_name).is_file():
        try:
            return load_file(str(src / safe_name))
        except Exception as exc:  # safetensors raises its own error types
            raise XlpeftError(f"cannot read {src / safe_name}: {exc}") from None
    if (src / bin_name).is_file():
        state = load_pickled(src / bin_name)
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise XlpeftError(f"{src / bin_name} should hold a state dict of tensors")
        return dict(state)
    raise XlpeftError(f"{src} has neither {bin_name} nor {safe_name}; is it an AdapterHub adapter directory?")


def resolve_bn_config(raw: Any) -> dict[str, Any]:
    """An ``adapter_config.json`` ``config`` entry (a preset name or a dict) as a full BnConfig dict.

    Raises:
        XlpeftError: the config is not a bottleneck adapter (LoRA, prefix tuning, a union, ...), named.
    """
    if isinstance(raw, str):
        key = _PRESET_ALIASES.get(raw, raw)
        if key not in PRESETS:
            raise XlpeftError(
                f"AdapterHub config {raw!r} is not supported; xlpeft converts {', '.join(PRESETS)} "
                "(bottleneck adapters, optionally with a NICE invertible adapter)"
            )
        return dict(PRESETS[key])
    if not isinstance(raw, Mapping):
        raise XlpeftError(f"adapter_config.json `config` should be a name or an object; got {type(raw).__name__}")
    architecture = raw.get("architecture")
    if architecture not in (None, "bottleneck"):
        raise XlpeftError(
            f"AdapterHub config with architecture {architecture!r} is not supported; xlpeft converts "
            f"bottleneck adapters only ({', '.join(PRESETS)})"
        )
    config = {**_BN_DEFAULTS, **raw}
    legacy_inv = config.pop("invertible_adapter", None)  # adapters v1 nested the invertible adapter config
    if legacy_inv:
        config["inv_adapter"] = legacy_inv.get("block_type")
        config["inv_adapter_reduction_factor"] = legacy_inv.get("reduction_factor")
    return config


def _config_problems(c: Mapping[str, Any], num_layers: int) -> list[str]:
    """Everything in a BnConfig xlpeft's adapter maths cannot express exactly."""
    problems = []
    placement = (bool(c["mh_adapter"]), bool(c["output_adapter"]), bool(c["original_ln_before"]))
    if placement not in ((False, True, True), (True, True, False)):
        problems.append(
            f"mh_adapter={c['mh_adapter']}, output_adapter={c['output_adapter']}, original_ln_before="
            f"{c['original_ln_before']}: xlpeft has seq_bn (False, True, True) and double_seq_bn (True, True, False)"
        )
    if c["original_ln_before"] and c["residual_before_ln"] is not True:
        problems.append(f"residual_before_ln={c['residual_before_ln']!r} (seq_bn needs True)")
    if c["residual_before_ln"] not in (True, False):
        problems.append(f"residual_before_ln={c['residual_before_ln']!r}")
    for key, want in (("original_ln_after", True), ("ln_before", False), ("ln_after", False),
                      ("is_parallel", False), ("use_gating", False), ("phm_layer", False)):
        if bool(c[key]) != want:
            problems.append(f"{key}={c[key]!r} (xlpeft needs {want})")
    if isinstance(c["scaling"], str) or not isinstance(c["scaling"], (int, float)):
        problems.append(f"scaling={c['scaling']!r} (only a constant factor can be folded into the weights)")
    if str(c["non_linearity"]).lower() not in ACTIVATIONS:
        problems.append(f"non_linearity={c['non_linearity']!r} (xlpeft has {', '.join(ACTIVATIONS)})")
    if c["inv_adapter"] not in (None, "nice"):
        problems.append(f"inv_adapter={c['inv_adapter']!r} (xlpeft's invertible adapter is the NICE block)")
    if c["inv_adapter"] == "nice" and not isinstance(c["inv_adapter_reduction_factor"], (int, float)):
        problems.append(f"inv_adapter_reduction_factor={c['inv_adapter_reduction_factor']!r}")
    factors = {_reduction_factor(c["reduction_factor"], i) for i in range(num_layers)}
    if len(factors) > 1 or None in factors:
        problems.append(f"reduction_factor={c['reduction_factor']!r} (xlpeft uses one bottleneck width in every layer)")
    bad_leave_out = [i for i in c["leave_out"] or [] if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad_leave_out:
        problems.append(f"leave_out={c['leave_out']!r} names layers the base (with {num_layers}) lacks")
    return problems


def _reduction_factor(value: Any, layer: int) -> float | None:
    if isinstance(value, Mapping):
        value = value.get(str(layer), value.get("default"))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def adapter_config_from(bn: Mapping[str, Any], num_layers: int, versioned: bool = True) -> AdapterConfig:
    """The :class:`AdapterConfig` computing exactly what AdapterHub's BnConfig ``bn`` computes.

    Args:
        bn: a full BnConfig dict (see :func:`resolve_bn_config`).
        num_layers: transformer layers of the base.
        versioned: the config file has a ``version`` key; without one, AdapterHub reads ``gelu`` as ``gelu_new``.

    Raises:
        XlpeftError: naming every option xlpeft's adapter maths cannot express.
    """
    bn = dict(bn)
    if not versioned and bn["non_linearity"] in _OLD_ACTIVATIONS:
        bn["non_linearity"] = _OLD_ACTIVATIONS[bn["non_linearity"]]
    problems = _config_problems(bn, num_layers)
    if problems:
        raise XlpeftError("AdapterHub config options xlpeft cannot reproduce exactly: " + "; ".join(problems))
    return AdapterConfig(
        placement="pfeiffer" if bn["original_ln_before"] else "houlsby",
        reduction_factor=_reduction_factor(bn["reduction_factor"], 0),
        non_linearity=str(bn["non_linearity"]).lower(),
        invertible=bn["inv_adapter"] == "nice",
        inv_reduction_factor=float(bn["inv_adapter_reduction_factor"] or 2.0),
    )


def _rename_weights(weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None, set[str]]:
    """AdapterHub parameter names -> xlpeft AdapterModule names; returns (state, adapter name, unexpected keys)."""
    state: dict[str, torch.Tensor] = {}
    names, unexpected = set(), set()
    for key, tensor in weights.items():
        if m := _LAYER_KEY.match(key):
            state[f"layers.{m['layer']}.{_SITES[m['site']]}.{_PARTS[m['part']]}.{m['kind']}"] = tensor
        elif m := _INV_KEY.match(key):
            state[f"invertible.{m['block']}.{_PARTS[m['part']]}.{m['kind']}"] = tensor
        else:
            unexpected.add(key)
            continue
        names.add(m["name"])
    if len(names) > 1:
        raise XlpeftError(f"the weights hold several adapters ({', '.join(sorted(names))}); save each on its own")
    return state, next(iter(names), None), unexpected


def _head_from(head_cfg: Mapping[str, Any], weights: Mapping[str, torch.Tensor], path: Path) -> tuple[str, list[str], dict]:
    """An AdapterHub prediction head -> (xlpeft head kind, labels, head state dict)."""
    c = head_cfg.get("config") or {}
    head_type, layers = c.get("head_type"), c.get("layers")
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        m = _HEAD_KEY.match(key)
        if m is None:
            raise XlpeftError(f"{path}: unexpected head weight {key!r}")
        by_index.setdefault(int(m["index"]), {})[m["kind"]] = tensor
    if head_type == "tagging" and layers == 1:
        kind, plan = "token_classification", {"classifier": 1}
    elif (head_type == "classification" and layers == 2 and c.get("activation_function") == "tanh"
          and not c.get("use_pooler") and c.get("bias", True)):
        kind, plan = "sequence_classification", {"dense": 1, "classifier": 4}
    else:
        raise XlpeftError(
            f"{path}: AdapterHub head {head_type!r} with layers={layers}, activation {c.get('activation_function')!r}, "
            f"use_pooler={c.get('use_pooler')} does not map onto an xlpeft head (tagging with 1 layer, or classification "
            "with 2 layers, tanh, no pooler); convert with --without-head to take the adapter alone"
        )
    state = {}
    for prefix, index in plan.items():
        pair = by_index.get(index, {})
        if set(pair) != {"weight", "bias"}:
            raise XlpeftError(f"{path}: head layer {index} should have a weight and a bias; found {sorted(pair)}")
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = pair["weight"], pair["bias"]
    num_labels = state["classifier.weight"].shape[0]
    label2id = c.get("label2id") or {}
    labels = [label for label, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
    if len(labels) != num_labels:
        labels = [f"LABEL_{i}" for i in range(num_labels)]
    return kind, labels, state


def _base_info(base: Any) -> tuple[dict[str, str], Any]:
    """(manifest base record, transformers config) of ``base`` without loading its weights when given by name."""
    from transformers import AutoConfig

    from xlpeft.models import fingerprint_dir, resolve_base_dir

    if hasattr(base, "fingerprint"):
        config = base.model.config
        return {"name": base.name, "fingerprint": base.fingerprint, "model_type": config.model_type}, config
    path = resolve_base_dir(str(base))
    config = AutoConfig.from_pretrained(path)
    return {"name": str(base), "fingerprint": fingerprint_dir(path), "model_type": config.model_type}, config


def import_adapterhub(src: str | Path, dst: str | Path, base: Any, name: str | None = None,
                      without_head: bool = False) -> Path:
    """Convert an AdapterHub adapter directory into an xlpeft adapter module at ``dst``.

    The module is a language module, or a task module when the directory has a prediction head
    (``head_config.json``) that maps onto an xlpeft head. Its manifest keeps the original config
    (``extra.imported``) so that :func:`export_adapterhub` writes it back faithfully.

    Args:
        src: the AdapterHub directory.
        dst: the module directory to write.
        base: the base the adapter was trained on (alias, hub id, directory or loaded Base).
        name: language code / task name to record [default: the adapter's name].
        without_head: ignore a prediction head.

    Raises:
        XlpeftError: an unsupported config (named), weights that do not fit the config or the base.
    """
    src, dst = Path(src), check_output_dir(dst, MANIFEST)
    if not (src / CONFIG_FILE).is_file():
        raise XlpeftError(f"{src} has no {CONFIG_FILE}; is it an AdapterHub adapter directory?")
    meta = _read_json(src / CONFIG_FILE)
    bn = resolve_bn_config(meta.get("config"))
    base_ref, base_config = _base_info(base)
    num_layers, hidden = int(base_config.num_hidden_layers), int(base_config.hidden_size)
    problems = []
    if meta.get("model_type") and meta["model_type"] != base_ref["model_type"]:
        problems.append(f"the adapter was trained on a {meta['model_type']!r} model but the base is {base_ref['model_type']!r}")
    if meta.get("hidden_size") and int(meta["hidden_size"]) != hidden:
        problems.append(f"the adapter has hidden size {meta['hidden_size']} but the base has {hidden}")
    if problems:
        raise XlpeftError(f"{src} does not fit base {base_ref['name']!r}: " + "; ".join(problems))
    config = adapter_config_from(bn, num_layers, versioned="version" in meta)
    state, weight_name, unexpected = _rename_weights(_read_weights(src, WEIGHTS_SAFE, WEIGHTS_BIN))
    if unexpected:
        raise XlpeftError(f"{src}: weights xlpeft cannot place: {', '.join(sorted(unexpected)[:6])}")
    state = _complete(state, config, bn, hidden, num_layers, src)
    adapter_name = name or meta.get("name") or weight_name or src.name

    head = None
    if (src / HEAD_CONFIG_FILE).is_file() and not without_head:
        head_meta = _read_json(src / HEAD_CONFIG_FILE)
        head = _head_from(head_meta, _read_weights(src, HEAD_SAFE, HEAD_BIN), src)
    imported = {"format": "adapterhub", "source": str(src), "adapter_name": meta.get("name") or weight_name,
                "version": meta.get("version"), "config": bn, "scaling": float(bn["scaling"]),
                "leave_out": sorted(bn["leave_out"] or [])}
    tensors: dict[str, dict[str, torch.Tensor]] = {"adapter": state}
    extra: dict[str, Any] = {"imported": imported}
    kind = "language"
    if head is not None:
        kind, (head_kind, labels, head_state) = "task", head
        tensors["head"] = head_state
        dropout = (head_meta.get("config") or {}).get("dropout_prob")
        extra.update(labels=labels, head=head_kind, head_dropout=0.1 if dropout is None else float(dropout))
    manifest = Manifest(
        kind=kind, method="adapter", base=base_ref, config=asdict(config),
        lang=adapter_name if kind == "language" else None, task=adapter_name if kind == "task" else None,
        trainable_parameters=sum(t.numel() for s in tensors.values() for t in s.values()), extra=extra,
    )
    return save_module(dst, manifest, tensors)


def _complete(state: dict[str, torch.Tensor], config: AdapterConfig, bn: Mapping[str, Any], hidden: int,
              num_layers: int, src: Path) -> dict[str, torch.Tensor]:
    """Fold ``scaling``, fill ``leave_out`` layers with the identity, and check the weights fit exactly."""
    scaling = float(bn["scaling"])
    module = AdapterModule(config, hidden, num_layers)
    expected = module.state_dict()
    leave_out = set(bn["leave_out"] or [])
    out: dict[str, torch.Tensor] = {}
    for key, ref in expected.items():
        if _layer_of(key) in leave_out:
            out[key] = torch.zeros_like(ref)  # up = 0: the site is the identity, as if no adapter were there
            continue
        if key not in state:
            continue
        tensor = state[key].detach().to(ref.dtype).clone()
        if scaling != 1.0 and ".up." in key and key.startswith("layers."):
            tensor = tensor * scaling  # (s W) a + s b = s (W a + b): AdapterHub scales the up-projection's output
        out[key] = tensor
    stray = sorted(k for k in state if k not in expected or _layer_of(k) in leave_out)
    if stray:
        raise XlpeftError(f"{src}: weights where the config puts no adapter: {', '.join(stray[:6])}")
    try:
        module.load_state_dict(out, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise XlpeftError(f"{src}: the weights do not fit the config on this base ({detail})") from None
    return out


def _layer_of(key: str) -> int | None:
    """The layer of an xlpeft adapter weight name (``layers.3.ffn.up.weight`` -> 3); None for the invertible adapter."""
    return int(key.split(".")[1]) if key.startswith("layers.") else None


# ---------------------------------------------------------------- writing
def export_adapterhub(src: str | Path, dst: str | Path, name: str | None = None, safetensors: bool = False) -> Path:
    """Write an xlpeft adapter module as an AdapterHub adapter directory loadable by ``load_adapter``.

    Args:
        src: an xlpeft adapter module directory.
        dst: the directory to write (replaced if it exists).
        name: the adapter name inside the weights [default: the module's language or task].
        safetensors: write ``adapter.safetensors`` (``load_adapter(..., use_safetensors=True)``)
            instead of ``pytorch_adapter.bin``.

    Raises:
        XlpeftError: the module is not an adapter, or its base architecture has no AdapterHub prefix here.
    """
    import shutil

    dst = check_output_dir(dst, CONFIG_FILE)
    module = load_module(src)
    m = module.manifest
    if m.method != "adapter":
        raise XlpeftError(f"{src} is a {m.method!r} module; AdapterHub takes adapters (export sft modules to composable-sft)")
    model_type = m.base.get("model_type", "")
    if model_type not in _PREFIXES:
        raise XlpeftError(f"base model type {model_type!r} has no AdapterHub mapping here; known: {', '.join(_PREFIXES)}")
    from xlpeft.config import build

    config = build(AdapterConfig, m.config)
    state = module.tensors["adapter"]
    hidden = int(state["layers.0.ffn.down.weight"].shape[1])
    adapter_name = name or m.lang or m.task or Path(src).name
    if not re.fullmatch(r"[^.\s]+", adapter_name):
        raise XlpeftError(f"adapter name {adapter_name!r} should have no dots or spaces (it becomes part of parameter names)")
    imported = m.extra.get("imported") or {}
    from_here = imported.get("format") == "adapterhub"
    bn = _bn_config_for(config, imported.get("config") if from_here else None)
    scaling = float(imported.get("scaling", 1.0)) if from_here else 1.0
    leave_out = [i for i in (imported.get("leave_out") or []) if _is_zero_layer(state, i)] if from_here else []
    bn.update(scaling=scaling, leave_out=leave_out)
    prefix = _PREFIXES[model_type]
    weights = _foreign_weights(state, prefix, adapter_name, scaling, set(leave_out))
    meta = {"config": bn, "hidden_size": hidden, "model_class": _MODEL_CLASSES[model_type],
            "model_name": m.base.get("name"), "model_type": model_type, "name": adapter_name,
            "version": WRITES_VERSION}
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    (dst / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _write_weights(dst, weights, WEIGHTS_SAFE if safetensors else WEIGHTS_BIN)
    if m.kind == "task" and "head" in module.tensors:
        head_meta, head_weights = _foreign_head(m, module.tensors["head"], adapter_name, hidden)
        (dst / HEAD_CONFIG_FILE).write_text(json.dumps(head_meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _write_weights(dst, head_weights, HEAD_SAFE if safetensors else HEAD_BIN)
    return dst


def _bn_config_for(config: AdapterConfig, original: Mapping[str, Any] | None) -> dict[str, Any]:
    preset = ("seq_bn" if config.placement == "pfeiffer" else "double_seq_bn") + ("_inv" if config.invertible else "")
    bn = dict(original) if original else dict(PRESETS[preset])  # keeps training-only fields of an imported config
    bn.update({k: v for k, v in PRESETS[preset].items() if k in ("mh_adapter", "output_adapter", "original_ln_before",
                                                                    "inv_adapter")})
    bn.update(reduction_factor=_plain_number(config.reduction_factor), non_linearity=config.non_linearity,
              inv_adapter_reduction_factor=_plain_number(config.inv_reduction_factor) if config.invertible else None)
    return bn


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _is_zero_layer(state: Mapping[str, torch.Tensor], layer: int) -> bool:
    mine = [t for k, t in state.items() if k.startswith(f"layers.{layer}.")]
    return bool(mine) and all(not torch.any(t) for t in mine)


def _foreign_weights(state: Mapping[str, torch.Tensor], prefix: str, name: str, scaling: float,
                     leave_out: set[int]) -> dict[str, torch.Tensor]:
    sites = {v: k for k, v in _SITES.items()}
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "layers":
            layer, site, part, kind = int(parts[1]), parts[2], parts[3], parts[4]
            if layer in leave_out:
                continue
            if part == "up" and scaling != 1.0:
                tensor = tensor / scaling
            hub_part = "adapter_down.0" if part == "down" else "adapter_up"
            out[f"{prefix}.encoder.layer.{layer}.{sites[site]}.adapters.{name}.{hub_part}.{kind}"] = tensor
        else:  # invertible.{F|G}.{down|up}.{weight|bias}
            block, part, kind = parts[1], parts[2], parts[3]
            out[f"{prefix}.invertible_adapters.{name}.{block}.{'0' if part == 'down' else '2'}.{kind}"] = tensor
    return out


def _foreign_head(m: Manifest, head: Mapping[str, torch.Tensor], name: str, hidden: int) -> tuple[dict, dict]:
    labels = list(m.extra.get("labels") or [])
    common = {"dropout_prob": m.extra.get("head_dropout"), "label2id": {label: i for i, label in enumerate(labels)},
              "num_labels": len(labels), "activation_function": "tanh"}
    if m.extra.get("head") == "token_classification":
        config = {**common, "head_type": "tagging", "layers": 1}
        weights = {f"heads.{name}.1.{k}": head[f"classifier.{k}"] for k in ("weight", "bias")}
    elif m.extra.get("head") == "sequence_classification":
        config = {**common, "head_type": "classification", "layers": 2, "use_pooler": False, "bias": True}
        weights = {f"heads.{name}.{i}.{k}": head[f"{p}.{k}"] for p, i in (("dense", 1), ("classifier", 4))
                   for k in ("weight", "bias")}
    else:
        raise XlpeftError(f"task head {m.extra.get('head')!r} has no AdapterHub equivalent here")
    model_type = m.base.get("model_type", "")
    meta = {"config": config, "hidden_size": hidden, "model_class": _MODEL_CLASSES[model_type],
            "model_name": m.base.get("name"), "model_type": model_type, "name": name, "version": WRITES_VERSION}
    return meta, weights


def _write_weights(dst: Path, weights: Mapping[str, torch.Tensor], filename: str) -> None:
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
    if filename.endswith(".safetensors"):
        save_file(plain, str(dst / filename))
    else:
        torch.save(plain, dst / filename)  # AdapterHub's own format: a pickled plain state dict
