"""AdapterHub config dicts (``adapters`` 1.3.0) and the names in its files, as xlpeft reads them.

:func:`resolve_config` tells which xlpeft method an ``adapter_config.json`` ``config`` entry is
(``adapter``, ``compacter``, ``parallel``, ``lora``, ``ia3``, ``prefix``, ``mam``) and completes it
with AdapterHub's defaults; anything else is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from xlpeft.errors import XlpeftError
from xlpeft.methods.adapters import AdapterConfig
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
_PAR = {"original_ln_before": False, "mh_adapter": False, "non_linearity": "relu", "reduction_factor": 2,
        "init_weights": "mam_adapter", "is_parallel": True, "scaling": 4.0}
_PHM = {"phm_layer": True, "reduction_factor": 32, "non_linearity": "gelu"}
BN_PRESETS: dict[str, dict[str, Any]] = {  # the other bottleneck presets of adapters 1.3.0
    "par_bn": {**_BN_DEFAULTS, **_PAR},
    "compacter": {**_BN_DEFAULTS, **_DOUBLE, **_PHM},
    "compacter++": {**_BN_DEFAULTS, **_SEQ, **_PHM},
}
LORA_DEFAULTS: dict[str, Any] = {  # LoRAConfig() in adapters 1.3.0, as save_adapter writes it
    "alpha": 8, "architecture": "lora", "attn_matrices": ["q", "v"], "composition_mode": "add", "dropout": 0.0,
    "dtype": None, "init_weights": "lora", "init_weights_seed": None, "intermediate_lora": False, "leave_out": [],
    "output_lora": False, "r": 8, "selfattn_lora": True, "use_dora": False, "use_gating": False, "vera_b": None,
    "vera_d": None,
}
IA3_DEFAULTS: dict[str, Any] = {**LORA_DEFAULTS, "alpha": 1, "attn_matrices": ["k", "v"], "composition_mode": "scale",
                                "init_weights": "ia3", "intermediate_lora": True, "r": 1}
PREFIX_DEFAULTS: dict[str, Any] = {  # PrefixTuningConfig() in adapters 1.3.0
    "architecture": "prefix_tuning", "bottleneck_size": 512, "cross_prefix": True, "dropout": 0.0,
    "encoder_prefix": True, "flat": False, "init_weights_seed": None, "leave_out": [], "non_linearity": "tanh",
    "prefix_length": 30, "shared_gating": True, "use_gating": False,
}
_NAMED = {"lora": LORA_DEFAULTS, "ia3": IA3_DEFAULTS, "prefix_tuning": PREFIX_DEFAULTS,
          "prefix_tuning_flat": {**PREFIX_DEFAULTS, "flat": True},
          "mam": {"architecture": "union", "configs": [{**PREFIX_DEFAULTS, "bottleneck_size": 800}, BN_PRESETS["par_bn"]]}}
CONVERTED = ("seq_bn", "seq_bn_inv", "double_seq_bn", "double_seq_bn_inv", "compacter", "compacter++", "par_bn",
             "lora", "ia3", "prefix_tuning", "mam")
"""What xlpeft converts, as AdapterHub names the configs (any dict of those architectures with options xlpeft can express)."""
_PRESET_ALIASES = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "pfeiffer+inv": "seq_bn_inv",
                   "houlsby+inv": "double_seq_bn_inv"}
_OLD_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # configs saved before "version" existed
MODEL_CLASSES = {"bert": "BertAdapterModel", "xlm-roberta": "XLMRobertaAdapterModel", "roberta": "RobertaAdapterModel"}
PREFIXES = {"bert": "bert", "xlm-roberta": "roberta", "roberta": "roberta"}

LAYER_KEY = re.compile(
    r"^(?:(?P<prefix>\w+)\.)?encoder\.layer\.(?P<layer>\d+)\.(?P<site>attention\.output|output)\.adapters\."
    r"(?P<name>[^.]+)\.(?P<part>adapter_down\.0|adapter_up)\.(?P<kind>weight|bias)$"
)
INV_KEY = re.compile(
    r"^(?:(?P<prefix>\w+)\.)?invertible_adapters\.(?P<name>[^.]+)\.(?P<block>[FG])\.(?P<part>[02])\.(?P<kind>weight|bias)$"
)
HEAD_KEY = re.compile(r"^heads\.(?P<name>[^.]+)\.(?P<index>\d+)\.(?P<kind>weight|bias)$")
SITES = {"attention.output": "attn", "output": "ffn"}
PARTS = {"adapter_down.0": "down", "adapter_up": "up", "0": "down", "2": "up"}



def resolve_config(raw: Any) -> tuple[str, Any]:
    """(xlpeft method, full AdapterHub config) of an ``adapter_config.json`` ``config`` entry.

    The config is a dict (a list of two dicts for ``mam``: prefix tuning, then the parallel adapter).

    Raises:
        XlpeftError: a method xlpeft has no counterpart for (prompt tuning, ReFT, VeRA, unions other than MAM, ...),
            named with what xlpeft converts.
    """
    if isinstance(raw, str) and raw in _NAMED:
        raw = _NAMED[raw]
    if isinstance(raw, str) and raw in BN_PRESETS:
        raw = BN_PRESETS[raw]
    architecture = raw.get("architecture") if isinstance(raw, Mapping) else None
    if architecture == "lora":
        if raw.get("vera_d") is not None or raw.get("vera_b") is not None:
            raise _unsupported(raw, "VeRA (vera_d / vera_b)")
        base = IA3_DEFAULTS if raw.get("composition_mode") == "scale" else LORA_DEFAULTS
        full = {**base, **raw}
        return ("ia3" if full["composition_mode"] == "scale" else "lora"), full
    if architecture == "prefix_tuning":
        return "prefix", {**PREFIX_DEFAULTS, **raw}
    if architecture == "union":
        parts = list(raw.get("configs") or [])
        kinds = [c.get("architecture") if isinstance(c, Mapping) else c for c in parts]
        if (len(parts) == 2 and kinds[0] == "prefix_tuning" and kinds[1] in (None, "bottleneck")
                and parts[1].get("is_parallel")):
            return "mam", [{**PREFIX_DEFAULTS, **parts[0]}, resolve_bn_config(parts[1])]
        raise _unsupported(raw, f"a union of {', '.join(map(repr, kinds))} (xlpeft's one union is MAM: "
                                "prefix_tuning then a parallel bottleneck, par_bn)")
    bn = resolve_bn_config(raw)
    if bn["phm_layer"] and not bn["is_parallel"]:
        return "compacter", bn
    if bn["is_parallel"] and not bn["phm_layer"]:
        return "parallel", bn
    return "adapter", bn


def _unsupported(raw: Any, what: str) -> XlpeftError:
    name = raw.get("architecture") if isinstance(raw, Mapping) else raw
    return XlpeftError(f"AdapterHub config {name!r} ({what}) is not supported; xlpeft converts "
                       f"{', '.join(CONVERTED)}")


def resolve_bn_config(raw: Any) -> dict[str, Any]:
    """An ``adapter_config.json`` ``config`` entry (a preset name or a dict) as a full BnConfig dict.

    Raises:
        XlpeftError: the config is not a bottleneck adapter (LoRA, prefix tuning, a union, ...), named.
    """
    if isinstance(raw, str):
        key = _PRESET_ALIASES.get(raw, raw)
        if key not in PRESETS and key not in BN_PRESETS:
            raise XlpeftError(f"AdapterHub config {raw!r} is not supported; xlpeft converts {', '.join(CONVERTED)}")
        return dict(PRESETS.get(key) or BN_PRESETS[key])
    if not isinstance(raw, Mapping):
        raise XlpeftError(f"adapter_config.json `config` should be a name or an object; got {type(raw).__name__}")
    architecture = raw.get("architecture")
    if architecture not in (None, "bottleneck"):
        raise XlpeftError(f"AdapterHub config with architecture {architecture!r} is not supported; xlpeft converts "
                          f"{', '.join(CONVERTED)} (bottleneck, lora and prefix_tuning architectures, and MAM's union)")
    config = {**_BN_DEFAULTS, **raw}
    legacy_inv = config.pop("invertible_adapter", None)  # adapters v1 nested the invertible adapter config
    if legacy_inv:
        config["inv_adapter"] = legacy_inv.get("block_type")
        config["inv_adapter_reduction_factor"] = legacy_inv.get("reduction_factor")
    return config


def _config_problems(c: Mapping[str, Any], num_layers: int, variant: str = "adapter") -> list[str]:
    """Everything in a BnConfig the xlpeft method ``variant`` (adapter, compacter, parallel) cannot express exactly."""
    problems = []
    placement = (bool(c["mh_adapter"]), bool(c["output_adapter"]), bool(c["original_ln_before"]))
    if variant == "parallel":
        if placement not in ((False, True, False), (True, False, False), (True, True, False)):
            problems.append(f"mh_adapter={c['mh_adapter']}, output_adapter={c['output_adapter']}, original_ln_before="
                            f"{c['original_ln_before']}: a parallel adapter sits beside attention and/or the FFN "
                            "with original_ln_before=False")
    elif placement not in ((False, True, True), (True, True, False)):
        problems.append(
            f"mh_adapter={c['mh_adapter']}, output_adapter={c['output_adapter']}, original_ln_before="
            f"{c['original_ln_before']}: xlpeft has seq_bn (False, True, True) and double_seq_bn (True, True, False)"
        )
    if variant != "parallel" and c["original_ln_before"] and c["residual_before_ln"] is not True:
        problems.append(f"residual_before_ln={c['residual_before_ln']!r} (seq_bn needs True)")
    if variant != "parallel" and c["residual_before_ln"] not in (True, False):
        problems.append(f"residual_before_ln={c['residual_before_ln']!r}")
    needs = {"original_ln_after": True, "ln_before": False, "ln_after": False, "use_gating": False,
             "is_parallel": variant == "parallel", "phm_layer": variant == "compacter"}
    if variant == "compacter":
        needs["shared_W_phm"] = False
    for key, want in needs.items():
        if bool(c[key]) != want:
            problems.append(f"{key}={c[key]!r} (xlpeft's {variant} needs {want})")
    if isinstance(c["scaling"], str) or not isinstance(c["scaling"], (int, float)):
        problems.append(f"scaling={c['scaling']!r} (only a constant factor is expressible)")
    if str(c["non_linearity"]).lower() not in ACTIVATIONS:
        problems.append(f"non_linearity={c['non_linearity']!r} (xlpeft has {', '.join(ACTIVATIONS)})")
    if variant != "adapter" and c["inv_adapter"] is not None:
        problems.append(f"inv_adapter={c['inv_adapter']!r} (xlpeft's {variant} has no invertible adapter)")
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
