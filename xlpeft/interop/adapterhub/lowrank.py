"""AdapterHub ``LoRAConfig`` modules (``architecture: lora``) <-> xlpeft ``lora`` and ``ia3`` modules.

AdapterHub 1.3.0 (``methods/lora.py``) wraps the target ``nn.Linear`` s of each layer and keeps, per
target, ``lora_A`` (r, in) and ``lora_B`` (out, r) under ``{p}.encoder.layer.{i}.{linear}.loras.{a}.``;
``{linear}`` is ``attention.self.query|key|value`` (``selfattn_lora`` + ``attn_matrices``),
``intermediate.dense`` (``intermediate_lora``) or ``output.dense`` (``output_lora``).

* ``composition_mode="add"`` is LoRA (Hu et al. 2022): the Linear's output gains
  (alpha / r) · x Aᵀ Bᵀ, exactly xlpeft's :class:`~xlpeft.methods.lora.LoraPair` (same A, B, same
  scaling), so the tensors copy over unchanged. ``leave_out`` becomes xlpeft's ``layers``.
* ``composition_mode="scale"`` (``IA3Config``) multiplies the Linear's output by alpha · ``lora_B``
  (out, 1). On keys and values that is (IA)³ (Liu et al. 2022) as xlpeft computes it; alpha is folded
  into the vector. On ``intermediate.dense`` AdapterHub scales the FFN's *pre-activation* W1·x, where
  Liu et al. and xlpeft scale the activation γ(W1·x): not the same function, so such a config (the
  ``IA3Config`` default) is refused by name, as is ``output_lora``. Layers left out get vectors of ones.

Refused by name: DoRA (``use_dora``: AdapterHub normalises W0 + B·A without the alpha/r factor and
rescales the bias too, where Liu et al. 2024, peft and xlpeft normalise W0 + (alpha/r)·B·A and leave
the bias alone), gating, VeRA, half-precision ``dtype``; on export, LoRA on the attention output
(AdapterHub has no such target).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from xlpeft.config import build
from xlpeft.errors import XlpeftError
from xlpeft.interop.adapterhub.config import IA3_DEFAULTS, LORA_DEFAULTS
from xlpeft.methods.ia3 import IA3Config
from xlpeft.methods.lora import SITES, LoraConfig, parse_layers, parse_targets

KEY = re.compile(
    r"^(?:\w+\.)?encoder\.layer\.(?P<layer>\d+)\.(?P<linear>attention\.self\.(?:query|key|value)|intermediate\.dense"
    r"|output\.dense)\.loras\.(?P<name>[^.]+)\.(?P<part>lora_A|lora_B|m\.weight)$"
)
LINEARS = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
           "intermediate.dense": "intermediate", "output.dense": "ffn_output"}
"""AdapterHub's wrapped Linear (relative to a layer) -> the site name of xlpeft's architecture table."""
ATTN = {"q": "query", "k": "key", "v": "value"}


def _sites(c: Mapping[str, Any]) -> list[str]:
    """The xlpeft sites an AdapterHub LoRA config targets, in xlpeft's table order."""
    chosen = {ATTN[m] for m in c["attn_matrices"] or [] if m in ATTN} if c["selfattn_lora"] else set()
    chosen |= {"intermediate"} if c["intermediate_lora"] else set()
    chosen |= {"ffn_output"} if c["output_lora"] else set()
    return [s for s in SITES if s in chosen]


def _common_problems(c: Mapping[str, Any], num_layers: int) -> list[str]:
    problems = []
    bad = [m for m in c["attn_matrices"] or [] if m not in ATTN]
    if bad:
        problems.append(f"attn_matrices={c['attn_matrices']!r} (AdapterHub's q, k, v only)")
    if c["use_gating"]:
        problems.append("use_gating=True (a learned gate; xlpeft has none)")
    if c["dtype"] not in (None, "float32"):
        problems.append(f"dtype={c['dtype']!r} (xlpeft keeps module weights in float32)")
    bad_leave_out = [i for i in c["leave_out"] or [] if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad_leave_out:
        problems.append(f"leave_out={c['leave_out']!r} names layers the base (with {num_layers}) lacks")
    elif len(set(c["leave_out"] or [])) == num_layers:
        problems.append(f"leave_out={c['leave_out']!r} leaves out every layer")
    return problems


def _refuse(kind: str, problems: list[str]) -> None:
    if problems:
        raise XlpeftError(f"AdapterHub {kind} config options xlpeft cannot reproduce exactly: " + "; ".join(problems))


def _collect(weights: Mapping[str, torch.Tensor], src: Any) -> tuple[dict[tuple[int, str, str], torch.Tensor], str | None]:
    """(layer, site, part) -> tensor, and the adapter name; any other key is an error naming it."""
    out, names, stray = {}, set(), []
    for key, tensor in weights.items():
        m = KEY.match(key)
        if m is None:
            stray.append(key)
            continue
        names.add(m["name"])
        out[(int(m["layer"]), LINEARS[m["linear"]], m["part"])] = tensor
    if stray:
        raise XlpeftError(f"{src}: weights xlpeft cannot place: {', '.join(sorted(stray)[:6])}")
    if len(names) > 1:
        raise XlpeftError(f"{src}: the weights hold several adapters ({', '.join(sorted(names))}); save each on its own")
    return out, next(iter(names), None)


def _check_keys(found: set, wanted: set, src: Any) -> None:
    missing, extra = sorted(wanted - found), sorted(found - wanted)
    if missing or extra:
        detail = "; ".join(part for part in (
            f"missing {', '.join(f'layer {i} {s} {p}' for i, s, p in missing[:4])}" if missing else "",
            f"unexpected {', '.join(f'layer {i} {s} {p}' for i, s, p in extra[:4])}" if extra else "") if part)
        raise XlpeftError(f"{src}: the weights do not fit the config ({detail})")


def _widths(geometry: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Site -> (in, out) features of its Linear on the base."""
    h, i = geometry["hidden"], geometry["intermediate"]
    return {"query": (h, h), "key": (h, h), "value": (h, h), "attn_output": (h, h), "intermediate": (h, i),
            "ffn_output": (i, h)}


def _layers_text(kept: list[int], num_layers: int) -> str | None:
    return None if len(kept) == num_layers else ",".join(map(str, kept))


def lora_to_xlpeft(c: Mapping[str, Any], weights: Mapping[str, torch.Tensor], geometry: Mapping[str, int],
                   src: Any) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]], str | None]:
    """An AdapterHub LoRA config + weights -> (xlpeft LoraConfig, {"lora": state}, adapter name).

    Raises:
        XlpeftError: options xlpeft's LoRA cannot express (named), or weights that do not fit.
    """
    num_layers = geometry["num_layers"]
    problems = _common_problems(c, num_layers)
    if c["use_dora"]:
        problems.append("use_dora=True (AdapterHub's DoRA normalises W0 + B·A without alpha/r and rescales the bias; "
                        "xlpeft's follows Liu et al. 2024 and peft)")
    if not isinstance(c["r"], int) or c["r"] < 1 or not isinstance(c["alpha"], (int, float)) or c["alpha"] <= 0:
        problems.append(f"r={c['r']!r}, alpha={c['alpha']!r} (a positive integer rank and a positive alpha)")
    sites = _sites(c)
    if not sites:
        problems.append("no target (selfattn_lora, intermediate_lora and output_lora all off)")
    _refuse("LoRA", problems)
    kept = [i for i in range(num_layers) if i not in set(c["leave_out"] or [])]
    config = LoraConfig(r=c["r"], alpha=float(c["alpha"]), dropout=float(c["dropout"]), target_modules=",".join(sites),
                        layers=_layers_text(kept, num_layers))
    found, name = _collect(weights, src)
    _check_keys(set(found), {(i, s, p) for i in kept for s in sites for p in ("lora_A", "lora_B")}, src)
    widths, state = _widths(geometry), {}
    for (i, site, part), tensor in sorted(found.items()):
        fan_in, fan_out = widths[site]
        want = (config.r, fan_in) if part == "lora_A" else (fan_out, config.r)
        if tuple(tensor.shape) != want:
            raise XlpeftError(f"{src}: layer {i} {site} {part} has shape {tuple(tensor.shape)}, the config and base "
                              f"need {want}")
        state[f"layers.{i}.{site}.{part}"] = tensor.detach().float().clone()
    return config, {"lora": state}, name


def lora_from_xlpeft(config_dict: Mapping[str, Any], tensors: Mapping[str, Mapping[str, torch.Tensor]], prefix: str,
                     name: str, original: Mapping[str, Any] | None,
                     num_layers: int | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An xlpeft LoRA module -> (AdapterHub LoRAConfig dict, AdapterHub weights).

    Args:
        num_layers: the base's layer count, needed only when the module adapts some layers (``layers``):
            AdapterHub lists the others in ``leave_out``.

    Raises:
        XlpeftError: DoRA, a target AdapterHub's LoRA lacks (the attention output), or ``layers`` without
            ``num_layers``.
    """
    config = build(LoraConfig, config_dict)
    sites = parse_targets(config.target_modules)
    problems = []
    if config.use_dora:
        problems.append("use_dora=True (AdapterHub's DoRA computes another function; see xlpeft.interop.adapterhub.lowrank)")
    if "attn_output" in sites:
        problems.append("target attn_output (AdapterHub's LoRA targets query/key/value, intermediate and output only)")
    if problems:
        raise XlpeftError("cannot write this LoRA module for AdapterHub: " + "; ".join(problems))
    state = tensors["lora"]
    wanted = parse_layers(config.layers)
    if wanted is not None and num_layers is None:
        raise XlpeftError(f"this LoRA module adapts layers {config.layers}; writing AdapterHub's leave_out needs the "
                          "base's layer count, and its base could not be read: make the base available (as --base "
                          "names it) and convert again")
    attn = [m for m, s in ATTN.items() if s in sites]
    hub = {**LORA_DEFAULTS, **(original or {})}
    hub.update(r=config.r, alpha=_plain(config.alpha), dropout=config.dropout, attn_matrices=attn or ["q", "v"],
               selfattn_lora=bool(attn), intermediate_lora="intermediate" in sites, output_lora="ffn_output" in sites,
               leave_out=[i for i in range(num_layers or 0) if wanted is not None and i not in wanted], use_dora=False,
               composition_mode="add")
    hub_linear = {v: k for k, v in LINEARS.items()}
    weights = {}
    for key, tensor in state.items():
        _, i, site, part = key.split(".")
        weights[f"{prefix}.encoder.layer.{i}.{hub_linear[site]}.loras.{name}.{part}"] = tensor
    return hub, weights


def _plain(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def ia3_to_xlpeft(c: Mapping[str, Any], weights: Mapping[str, torch.Tensor], geometry: Mapping[str, int],
                  src: Any) -> tuple[IA3Config, dict[str, dict[str, torch.Tensor]], str | None]:
    """An AdapterHub (IA)³ config (``composition_mode="scale"``) + weights -> (IA3Config, {"ia3": state}, name).

    Raises:
        XlpeftError: the FFN scaling (AdapterHub's sits before the activation), other options xlpeft lacks.
    """
    num_layers = geometry["num_layers"]
    problems = _common_problems(c, num_layers)
    if c["r"] != 1:
        problems.append(f"r={c['r']!r} (composition_mode='scale' needs r=1)")
    if not isinstance(c["alpha"], (int, float)) or isinstance(c["alpha"], bool):
        problems.append(f"alpha={c['alpha']!r}")
    if c["intermediate_lora"]:
        problems.append("intermediate_lora=True (AdapterHub scales the FFN pre-activation W1·x, intermediate.dense's "
                        "output; Liu et al. 2022 and xlpeft scale the activation γ(W1·x): another function)")
    if c["output_lora"]:
        problems.append("output_lora=True (a scaling of output.dense's output; xlpeft's (IA)³ has no such site)")
    if c["selfattn_lora"] and "q" in (c["attn_matrices"] or []):
        problems.append("attn_matrices with 'q' (xlpeft's (IA)³ scales keys and values, Liu et al. 2022)")
    if c["use_dora"]:
        problems.append("use_dora=True")
    sites = [s for s in _sites(c) if s in ("key", "value")]
    if not sites and not problems:
        problems.append("no target (selfattn_lora off or attn_matrices empty)")
    _refuse("(IA)³", problems)
    config = IA3Config(target_modules=",".join(sites))
    found, name = _collect(weights, src)
    leave_out = set(c["leave_out"] or [])
    _check_keys(set(found), {(i, s, "lora_B") for i in range(num_layers) if i not in leave_out for s in sites}, src)
    hidden, state = geometry["hidden"], {}
    for i in range(num_layers):
        for site in sites:
            vector = found.get((i, site, "lora_B"))
            if vector is None:  # a layer left out: the identity
                state[f"layers.{i}.{site}"] = torch.ones(hidden)
                continue
            if tuple(vector.shape) != (hidden, 1):
                raise XlpeftError(f"{src}: layer {i} {site} lora_B has shape {tuple(vector.shape)}, expected ({hidden}, 1)")
            state[f"layers.{i}.{site}"] = vector.detach().float().reshape(-1) * float(c["alpha"])  # out * (l * alpha)
    return config, {"ia3": state}, name


def ia3_from_xlpeft(config_dict: Mapping[str, Any], tensors: Mapping[str, Mapping[str, torch.Tensor]], prefix: str,
                    name: str, original: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An xlpeft (IA)³ module -> (AdapterHub IA3Config dict, weights); alpha written as 1.

    Raises:
        XlpeftError: the module scales the FFN activation, which AdapterHub's (IA)³ cannot (it scales W1·x).
    """
    config = build(IA3Config, config_dict)
    if "intermediate" in config.sites:
        raise XlpeftError("cannot write this (IA)³ module for AdapterHub: it scales the FFN activation γ(W1·x) "
                          "(Liu et al. 2022), AdapterHub's intermediate_lora scales W1·x, another function; "
                          "train one with --set target_modules=key,value to exchange it")
    state = tensors["ia3"]
    layers = sorted({int(k.split(".")[1]) for k in state})
    original = original or {}
    leave_out = [i for i in original.get("leave_out") or []
                 if all(torch.equal(state[f"layers.{i}.{s}"], torch.ones_like(state[f"layers.{i}.{s}"]))
                        for s in config.sites if f"layers.{i}.{s}" in state)]
    hub = {**IA3_DEFAULTS, **original}
    hub.update(alpha=1, r=1, composition_mode="scale", selfattn_lora=True, intermediate_lora=False, output_lora=False,
               attn_matrices=[m for m, s in ATTN.items() if s in config.sites], leave_out=leave_out)
    hub_linear = {v: k for k, v in LINEARS.items()}
    weights = {}
    for i in layers:
        if i in leave_out:
            continue
        for site in config.sites:
            weights[f"{prefix}.encoder.layer.{i}.{hub_linear[site]}.loras.{name}.lora_B"] = \
                state[f"layers.{i}.{site}"].reshape(-1, 1)  # (out, 1)
    return hub, weights
