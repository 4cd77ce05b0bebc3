"""AdapterHub's other bottleneck configs <-> xlpeft's ``compacter``, ``parallel`` and ``mam`` modules.

* ``phm_layer=True`` (``CompacterConfig`` = ``compacter``, ``CompacterPlusPlusConfig`` = ``compacter++``):
  the bottleneck's projections are PHM layers (Karimi Mahabadi et al. 2021), y = x·H + b with
  H = sum_i kron(rule_i, W_i); the names and layout are listed in :mod:`xlpeft.methods.compacter`,
  which computes the same H. AdapterHub's constant ``scaling`` is folded into the up-projection's
  output factor (``W_right`` or ``W``) and bias. ``leave_out`` layers get all-zero PHM weights (the identity).
* ``is_parallel=True`` (``ParBnConfig`` = ``par_bn``): AdapterHub's ``ParallelAdapter`` feeds the
  sub-layer input to the bottleneck and adds ``scaling`` times its output to the sub-layer's (He et
  al. 2022): :mod:`xlpeft.methods.parallel`, same ``Linear`` weights, ``scaling`` kept as a config value.
* ``MAMConfig`` (a ``union`` of ``prefix_tuning`` and a ``par_bn`` adapter): :mod:`xlpeft.methods.mam`,
  its prefix part converted as :mod:`.prefix` does, its FFN parallel adapter as above.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch

from xlpeft.config import build
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.interop.adapterhub.config import BN_PRESETS, LAYER_KEY, PARTS, SITES, _config_problems, _reduction_factor
from xlpeft.interop.adapterhub.prefix import is_prefix_key, prefix_from_xlpeft, prefix_to_xlpeft
from xlpeft.methods.compacter import CompacterConfig, CompacterModule
from xlpeft.methods.mam import MAMConfig
from xlpeft.methods.parallel import ParallelConfig, ParallelModule

PHM_KEY = re.compile(
    r"^(?:\w+\.)?encoder\.layer\.(?P<layer>\d+)\.(?P<site>attention\.output|output)\.adapters\.(?P<name>[^.]+)\."
    r"(?P<part>adapter_down\.0|adapter_up)\.(?P<kind>W_left|W_right|W|b|phm_rule|phm_rule_left|phm_rule_right)$"
)
SHARED_KEY = re.compile(r"^(?:\w+\.)?shared_parameters\.(?P<name>[^.]+)\.(?P<kind>phm_rule|phm_rule_left|phm_rule_right)$")
HUB_SITES = {v: k for k, v in SITES.items()}  # attn -> attention.output, ffn -> output


def _refuse(kind: str, problems: list[str]) -> None:
    if problems:
        raise XlpeftError(f"AdapterHub {kind} config options xlpeft cannot reproduce exactly: " + "; ".join(problems))


def _one_name(names: set[str], src: Any) -> str | None:
    if len(names) > 1:
        raise XlpeftError(f"{src}: the weights hold several adapters ({', '.join(sorted(names))}); save each on its own")
    return next(iter(names), None)


def _fit(module: torch.nn.Module, state: dict[str, torch.Tensor], leave_out: set[int], src: Any) -> dict[str, torch.Tensor]:
    """Fill ``leave_out`` layers with zeros (the identity) and check ``state`` loads strictly into ``module``."""
    expected = module.state_dict()
    stray = sorted(k for k in state if k not in expected or (k.startswith("layers.") and int(k.split(".")[1]) in leave_out))
    if stray:
        raise XlpeftError(f"{src}: weights where the config puts no adapter: {', '.join(stray[:6])}")
    out = {}
    for key, ref in expected.items():
        if key.startswith("layers.") and int(key.split(".")[1]) in leave_out:
            out[key] = torch.zeros_like(ref)
        elif key in state:
            out[key] = state[key].detach().to(ref.dtype).clone()
    try:
        module.load_state_dict(out, strict=True)
    except RuntimeError as exc:
        raise XlpeftError(f"{src}: the weights do not fit the config on this base ({' '.join(str(exc).split())[:400]})") from None
    return out


def _export_leave_out(state: Mapping[str, torch.Tensor], original: Mapping[str, Any] | None) -> list[int]:
    """The imported ``leave_out`` layers that are still all zeros (else they are written as trained layers)."""
    def zero(i: int) -> bool:
        mine = [t for k, t in state.items() if k.startswith(f"layers.{i}.")]
        return bool(mine) and all(not torch.any(t) for t in mine)
    return [i for i in (original or {}).get("leave_out") or [] if zero(i)]


# ---- Compacter

def compacter_to_xlpeft(bn: Mapping[str, Any], weights: Mapping[str, torch.Tensor], geometry: Mapping[str, int],
                        src: Any) -> tuple[CompacterConfig, dict[str, dict[str, torch.Tensor]], str | None]:
    """An AdapterHub PHM bottleneck (compacter / compacter++) -> (CompacterConfig, {"compacter": state}, name).

    Raises:
        XlpeftError: options xlpeft's Compacter cannot express (named), or weights that do not fit.
    """
    num_layers, hidden = geometry["num_layers"], geometry["hidden"]
    _refuse("compacter", _config_problems(bn, num_layers, "compacter"))
    try:
        config = CompacterConfig(
            placement="pfeiffer" if bn["original_ln_before"] else "houlsby",
            reduction_factor=_reduction_factor(bn["reduction_factor"], 0), non_linearity=str(bn["non_linearity"]).lower(),
            phm_dim=int(bn["phm_dim"]), phm_rank=int(bn["phm_rank"]), shared_phm_rule=bool(bn["shared_phm_rule"]),
            factorized_phm=bool(bn["factorized_phm_W"]), factorized_phm_rule=bool(bn["factorized_phm_rule"]),
            phm_init_range=float(bn["phm_init_range"]), phm_bias=bool(bn["phm_bias"]))
        module = CompacterModule(config, hidden, num_layers)
    except ConfigError as exc:
        raise XlpeftError(f"{src}: AdapterHub compacter config does not fit this base: {exc}") from None
    state, names, stray = {}, set(), []
    for key, tensor in weights.items():
        if m := PHM_KEY.match(key):
            state[f"layers.{m['layer']}.{SITES[m['site']]}.{PARTS[m['part']]}.{m['kind']}"] = tensor
        elif m := SHARED_KEY.match(key):
            state[m["kind"]] = tensor
        else:
            stray.append(key)
            continue
        names.add(m["name"])
    if stray:
        raise XlpeftError(f"{src}: weights xlpeft cannot place: {', '.join(sorted(stray)[:6])}")
    scaling = float(bn["scaling"])
    if scaling != 1.0:  # x·(s H) + s b = s (x·H + b): AdapterHub scales the up-projection's output
        for key in [k for k in state if ".up." in k and k.rsplit(".", 1)[1] in ("W_right", "W", "b")]:
            state[key] = state[key] * scaling
    out = _fit(module, state, set(bn["leave_out"] or []), src)
    return config, {"compacter": out}, _one_name(names, src)


def compacter_from_xlpeft(config_dict: Mapping[str, Any], tensors: Mapping[str, Mapping[str, torch.Tensor]], prefix: str,
                          name: str, original: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An xlpeft Compacter module -> (AdapterHub BnConfig dict with ``phm_layer=True``, weights)."""
    config = build(CompacterConfig, config_dict)
    preset = "compacter" if config.placement == "houlsby" else "compacter++"
    hub = dict(original) if original else dict(BN_PRESETS[preset])
    for key in ("mh_adapter", "output_adapter", "original_ln_before", "residual_before_ln"):
        hub[key] = BN_PRESETS[preset][key]
    hub.update(reduction_factor=_plain(config.reduction_factor), non_linearity=config.non_linearity,
               phm_dim=config.phm_dim, phm_rank=config.phm_rank, shared_phm_rule=config.shared_phm_rule,
               factorized_phm_W=config.factorized_phm, factorized_phm_rule=config.factorized_phm_rule,
               phm_init_range=config.phm_init_range, phm_bias=config.phm_bias, phm_layer=True, shared_W_phm=False)
    state = tensors["compacter"]
    leave_out = _export_leave_out(state, original)
    scaling = float(hub.get("scaling", 1.0)) if original else 1.0
    hub.update(leave_out=leave_out, scaling=scaling)
    weights = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] != "layers":  # the shared rule
            weights[f"{prefix}.shared_parameters.{name}.{key}"] = tensor
            continue
        i, site, proj, kind = int(parts[1]), parts[2], parts[3], parts[4]
        if i in leave_out:
            continue
        if scaling != 1.0 and proj == "up" and kind in ("W_right", "W", "b"):
            tensor = tensor / scaling
        hub_proj = "adapter_down.0" if proj == "down" else "adapter_up"
        weights[f"{prefix}.encoder.layer.{i}.{HUB_SITES[site]}.adapters.{name}.{hub_proj}.{kind}"] = tensor
    return hub, weights


def _plain(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# ---- parallel adapters

_PARALLEL_SITES = {(False, True): "ffn", (True, False): "attn", (True, True): "both"}


def _parallel_parts(bn: Mapping[str, Any], weights: Mapping[str, torch.Tensor], geometry: Mapping[str, int],
                    src: Any) -> tuple[ParallelConfig, dict[str, torch.Tensor], str | None]:
    num_layers, hidden = geometry["num_layers"], geometry["hidden"]
    _refuse("par_bn", _config_problems(bn, num_layers, "parallel"))
    config = ParallelConfig(placement=_PARALLEL_SITES[(bool(bn["mh_adapter"]), bool(bn["output_adapter"]))],
                            reduction_factor=_reduction_factor(bn["reduction_factor"], 0),
                            non_linearity=str(bn["non_linearity"]).lower(), scaling=float(bn["scaling"]))
    state, names, stray = {}, set(), []
    for key, tensor in weights.items():
        m = LAYER_KEY.match(key)
        if m is None:
            stray.append(key)
            continue
        names.add(m["name"])
        state[f"layers.{m['layer']}.{SITES[m['site']]}.{PARTS[m['part']]}.{m['kind']}"] = tensor
    if stray:
        raise XlpeftError(f"{src}: weights xlpeft cannot place: {', '.join(sorted(stray)[:6])}")
    out = _fit(ParallelModule(config, hidden, num_layers), state, set(bn["leave_out"] or []), src)
    return config, out, _one_name(names, src)


def parallel_to_xlpeft(bn: Mapping[str, Any], weights: Mapping[str, torch.Tensor], geometry: Mapping[str, int],
                       src: Any) -> tuple[ParallelConfig, dict[str, dict[str, torch.Tensor]], str | None]:
    """An AdapterHub parallel bottleneck (par_bn) -> (ParallelConfig, {"parallel": state}, name).

    Raises:
        XlpeftError: options xlpeft's parallel adapter cannot express (named), or weights that do not fit.
    """
    config, state, name = _parallel_parts(bn, weights, geometry, src)
    return config, {"parallel": state}, name


def _parallel_hub(config: ParallelConfig, state: Mapping[str, torch.Tensor], prefix: str, name: str,
                  original: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    hub = dict(original) if original else dict(BN_PRESETS["par_bn"])
    mh, out = {v: k for k, v in _PARALLEL_SITES.items()}[config.placement]
    leave_out = _export_leave_out(state, original)
    hub.update(mh_adapter=mh, output_adapter=out, original_ln_before=False, is_parallel=True, phm_layer=False,
               reduction_factor=_plain(config.reduction_factor), non_linearity=config.non_linearity,
               scaling=float(config.scaling), leave_out=leave_out)
    weights = {}
    for key, tensor in state.items():
        _, i, site, part, kind = key.split(".")
        if int(i) in leave_out:
            continue
        hub_part = "adapter_down.0" if part == "down" else "adapter_up"
        weights[f"{prefix}.encoder.layer.{i}.{HUB_SITES[site]}.adapters.{name}.{hub_part}.{kind}"] = tensor
    return hub, weights


def parallel_from_xlpeft(config_dict: Mapping[str, Any], tensors: Mapping[str, Mapping[str, torch.Tensor]], prefix: str,
                         name: str, original: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An xlpeft parallel-adapter module -> (AdapterHub BnConfig dict with ``is_parallel=True``, weights)."""
    return _parallel_hub(build(ParallelConfig, config_dict), tensors["parallel"], prefix, name, original)


# ---- MAM

def mam_to_xlpeft(parts: list[Mapping[str, Any]], weights: Mapping[str, torch.Tensor], geometry: Mapping[str, int],
                  src: Any) -> tuple[MAMConfig, dict[str, dict[str, torch.Tensor]], str | None]:
    """An AdapterHub MAM union (prefix_tuning, par_bn) -> (MAMConfig, {"parallel", "prefix"}, name).

    Raises:
        XlpeftError: either part's options xlpeft cannot express, an adapter part not beside the FFN only.
    """
    prefix_cfg, bn = parts
    placement = _PARALLEL_SITES.get((bool(bn["mh_adapter"]), bool(bn["output_adapter"])))
    if placement != "ffn":
        raise XlpeftError(f"AdapterHub MAM with a parallel adapter at {placement!r} (mh_adapter={bn['mh_adapter']}, "
                          f"output_adapter={bn['output_adapter']}) is not supported: xlpeft's MAM puts it beside the "
                          "FFN only (mh_adapter=False, output_adapter=True)")
    prefix_weights = {k: v for k, v in weights.items() if is_prefix_key(k)}
    adapter_weights = {k: v for k, v in weights.items() if not is_prefix_key(k)}
    p_config, p_tensors, p_name = prefix_to_xlpeft(prefix_cfg, prefix_weights, geometry, src)
    a_config, a_state, a_name = _parallel_parts(bn, adapter_weights, geometry, src)
    config = MAMConfig(prefix_length=p_config.prefix_length, width=p_config.width,
                       reduction_factor=a_config.reduction_factor, non_linearity=a_config.non_linearity,
                       scaling=a_config.scaling)
    return config, {"parallel": a_state, "prefix": p_tensors["prefix"]}, _one_name({n for n in (p_name, a_name) if n}, src)


def mam_from_xlpeft(config_dict: Mapping[str, Any], tensors: Mapping[str, Mapping[str, torch.Tensor]], prefix: str,
                    name: str, original: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An xlpeft MAM module -> (AdapterHub union config [prefix_tuning flat, par_bn], weights)."""
    config = build(MAMConfig, config_dict)
    originals = list(original) if isinstance(original, (list, tuple)) and len(original) == 2 else [None, None]
    p_hub, p_weights = prefix_from_xlpeft(asdict(config.prefix_config()), {"prefix": tensors["prefix"]}, prefix, name,
                                          originals[0])
    a_hub, a_weights = _parallel_hub(config.parallel_config(), tensors["parallel"], prefix, name, originals[1])
    return {"architecture": "union", "configs": [p_hub, a_hub]}, {**p_weights, **a_weights}
