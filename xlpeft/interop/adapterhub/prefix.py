"""AdapterHub ``PrefixTuningConfig`` modules <-> xlpeft ``prefix`` modules (``layers=all``).

AdapterHub 1.3.0 (``methods/prefix_tuning.py``) keeps one prefix generator per adapter in a pool
shared by all layers; ``save_adapter`` writes it once per layer and once at the model level
(``{p}.encoder.layer.{i}.attention.self.prefix_tuning.pool.prefix_tunings.{a}.self_prefix.*`` and
``{p}.prefix_tuning.prefix_tunings.{a}.self_prefix.*``), the same tensors under every name. Either

* the reparameterisation (``flat=False``): ``wte.weight`` (P, H) -> ``control_trans.0`` Linear(H, width)
  -> the non-linearity -> ``control_trans.2`` Linear(width, L·2·H), or
* the flat prefix (``flat=True``, or after ``eject_prefix_tuning``, which leaves ``flat=False`` in the
  saved config but writes the flat tensor): ``control_trans`` (P·L·2·H,).

Both give a (P, L·2, heads, head dim) block whose row ``2i`` is layer ``i``'s key prefix and ``2i + 1``
its value prefix, prepended to the projected keys and values, always visible (the attention mask is
widened by P ones). That is xlpeft's prefix method, whose saved layout is ``key`` / ``value`` (L, P, H)
with heads split as the model splits its keys. Importing runs the MLP once (Li & Liang 2021 drop it
after training; AdapterHub's ``eject_prefix_tuning`` does the same); exporting writes the flat form
(``flat=True``), which ``load_adapter`` rebuilds as a ``FlatPrefixTuning``.

Refused by name: ``leave_out`` (xlpeft puts prefixes in every layer), gating, ``encoder_prefix=False``,
a non-linearity xlpeft lacks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from xlpeft.config import build
from xlpeft.errors import XlpeftError
from xlpeft.interop.adapterhub.config import PREFIX_DEFAULTS
from xlpeft.methods.bottleneck import ACTIVATIONS
from xlpeft.methods.prefix import PrefixConfig

KEY = re.compile(
    r"^(?:\w+\.)?(?:encoder\.layer\.(?P<layer>\d+)\.attention\.self\.prefix_tuning\.pool|prefix_tuning)\."
    r"prefix_tunings\.(?P<name>[^.]+)\.(?P<location>[^.]+)\.(?P<part>wte\.weight|control_trans(?:\.[02]\.(?:weight|bias))?)$"
)
MLP_PARTS = ("wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight",
             "control_trans.2.bias")


def is_prefix_key(key: str) -> bool:
    return KEY.match(key) is not None


def prefix_problems(c: Mapping[str, Any]) -> list[str]:
    """Options of a PrefixTuningConfig dict xlpeft's prefix method cannot express."""
    problems = []
    if c["leave_out"]:
        problems.append(f"leave_out={c['leave_out']!r} (xlpeft puts prefixes in every layer)")
    if c["use_gating"]:
        problems.append("use_gating=True (a learned gate; xlpeft has none)")
    if not c["encoder_prefix"]:
        problems.append("encoder_prefix=False (no prefix in the encoder's self-attention: nothing to convert)")
    if str(c["non_linearity"]).lower() not in ACTIVATIONS:
        problems.append(f"non_linearity={c['non_linearity']!r} (xlpeft has {', '.join(ACTIVATIONS)})")
    if not isinstance(c["prefix_length"], int) or c["prefix_length"] < 1:
        problems.append(f"prefix_length={c['prefix_length']!r}")
    return problems


def _collect(weights: Mapping[str, torch.Tensor], src: Any) -> tuple[dict[str, torch.Tensor], str | None]:
    """part -> tensor over every copy AdapterHub writes (checked equal), and the adapter name."""
    parts: dict[str, torch.Tensor] = {}
    names, stray = set(), []
    for key, tensor in weights.items():
        m = KEY.match(key)
        if m is None or m["location"] != "self_prefix":
            stray.append(key)
            continue
        names.add(m["name"])
        seen = parts.setdefault(m["part"], tensor)
        if not torch.equal(seen, tensor):
            raise XlpeftError(f"{src}: the copies of {m['part']} differ ({key}); AdapterHub saves one shared "
                              "prefix pool, so the file is inconsistent")
    if stray:
        raise XlpeftError(f"{src}: weights xlpeft cannot place: {', '.join(sorted(stray)[:6])}")
    if len(names) > 1:
        raise XlpeftError(f"{src}: the weights hold several prefixes ({', '.join(sorted(names))}); save each on its own")
    return parts, next(iter(names), None)


@torch.no_grad()
def _control(c: Mapping[str, Any], parts: Mapping[str, torch.Tensor], geometry: Mapping[str, int],
             src: Any) -> tuple[torch.Tensor, bool]:
    """The prefix block (P, L·2·H) and whether it came through the MLP."""
    p, width = c["prefix_length"], geometry["num_layers"] * 2 * geometry["hidden"]
    if set(parts) == {"control_trans"}:  # flat, or ejected (whose saved config may still say flat=False)
        flat = parts["control_trans"].float()
        if flat.numel() != p * width:
            raise XlpeftError(f"{src}: the flat prefix has {flat.numel()} values; prefix_length {p} on this base "
                              f"needs {p * width} ({p} x {geometry['num_layers']} layers x 2 x {geometry['hidden']})")
        return flat.reshape(p, width), False
    if set(parts) != set(MLP_PARTS):
        raise XlpeftError(f"{src}: prefix weights {sorted(parts)} are neither the flat control_trans nor the MLP "
                          f"({', '.join(MLP_PARTS)})")
    wte, w0, b0, w2, b2 = (parts[k].float() for k in MLP_PARTS)
    if wte.shape != (p, geometry["hidden"]) or w2.shape[0] != width or w0.shape[0] != w2.shape[1]:
        raise XlpeftError(f"{src}: prefix MLP shapes wte {tuple(wte.shape)}, control_trans.2 {tuple(w2.shape)} do "
                          f"not fit prefix_length {p} on this base ({width} outputs)")
    act = ACTIVATIONS[str(c["non_linearity"]).lower()]()
    return F.linear(act(F.linear(wte, w0, b0)), w2, b2), True  # (P, L·2·H): the MLP run once


def prefix_to_xlpeft(c: Mapping[str, Any], weights: Mapping[str, torch.Tensor], geometry: Mapping[str, int],
                     src: Any) -> tuple[PrefixConfig, dict[str, dict[str, torch.Tensor]], str | None]:
    """An AdapterHub prefix config + weights -> (PrefixConfig, {"prefix": {"key", "value"}}, adapter name).

    Raises:
        XlpeftError: options xlpeft's prefix cannot express (named), or weights that do not fit the base.
    """
    problems = prefix_problems(c)
    if problems:
        raise XlpeftError("AdapterHub prefix_tuning config options xlpeft cannot reproduce exactly: " + "; ".join(problems))
    parts, name = _collect(weights, src)
    control, through_mlp = _control(c, parts, geometry, src)
    num_layers, hidden = geometry["num_layers"], geometry["hidden"]
    block = control.reshape(c["prefix_length"], num_layers, 2, hidden)  # (P, L, 2, H): row 2i key, 2i + 1 value
    state = {"key": block[:, :, 0].transpose(0, 1).contiguous(),  # (L, P, H)
             "value": block[:, :, 1].transpose(0, 1).contiguous()}  # (L, P, H)
    width = int(parts["control_trans.0.weight"].shape[0]) if through_mlp else int(c["bottleneck_size"])
    config = PrefixConfig(prefix_length=c["prefix_length"], layers="all", reparameterise=through_mlp, width=width)
    return config, {"prefix": state}, name


def prefix_from_xlpeft(config_dict: Mapping[str, Any], tensors: Mapping[str, Mapping[str, torch.Tensor]], prefix: str,
                       name: str, original: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An xlpeft prefix module -> (AdapterHub PrefixTuningConfig dict with ``flat=True``, weights).

    Raises:
        XlpeftError: a prompt-tuning module (``layers=input``): AdapterHub's prompt tuning is another method;
            ``shift_positions=true`` (AdapterHub does not renumber the tokens).
    """
    config = build(PrefixConfig, config_dict)
    if config.layers != "all":
        raise XlpeftError("cannot write a prompt-tuning module (layers=input) as AdapterHub prefix tuning: those "
                          "are per-layer key/value prefixes; export prefix modules with layers=all")
    if config.shift_positions:
        raise XlpeftError("cannot write a prefix module with shift_positions=true for AdapterHub: AdapterHub keeps the "
                          "tokens' positions, so it would compute another function; export one trained with "
                          "shift_positions=false (the default)")
    key, value = tensors["prefix"]["key"], tensors["prefix"]["value"]  # (L, P, H) each
    num_layers, length, hidden = key.shape
    flat = torch.stack([key, value], dim=2).transpose(0, 1).reshape(-1).contiguous()  # (P, L, 2, H) -> (P·L·2·H,)
    hub = {**PREFIX_DEFAULTS, **(original or {})}
    hub.update(flat=True, prefix_length=length, bottleneck_size=config.width, leave_out=[], use_gating=False,
               encoder_prefix=True)
    tail = f"prefix_tunings.{name}.self_prefix.control_trans"
    weights = {f"{prefix}.encoder.layer.{i}.attention.self.prefix_tuning.pool.{tail}": flat for i in range(num_layers)}
    weights[f"{prefix}.prefix_tuning.{tail}"] = flat  # one tensor under every name, as save_adapter writes the pool
    return hub, weights
