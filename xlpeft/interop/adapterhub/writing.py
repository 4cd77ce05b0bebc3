"""Export: an xlpeft module -> an AdapterHub directory that ``load_adapter`` reads.

MAD-X adapters are written here; lora, ia3, prefix, compacter, parallel and mam modules by
:data:`FROM_XLPEFT`'s converters. An imported module is written back with its original config's
training-only fields (dropout, init, ...) kept.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from xlpeft.config import build
from xlpeft.errors import XlpeftError
from xlpeft.interop import check_output_dir
from xlpeft.interop.adapterhub.config import (
    CONFIG_FILE,
    HEAD_BIN,
    HEAD_CONFIG_FILE,
    HEAD_SAFE,
    MODEL_CLASSES,
    PREFIXES,
    PRESETS,
    SITES,
    WEIGHTS_BIN,
    WEIGHTS_SAFE,
    WRITES_VERSION,
)
from xlpeft.interop.adapterhub.lowrank import ia3_from_xlpeft, lora_from_xlpeft
from xlpeft.interop.adapterhub.prefix import prefix_from_xlpeft
from xlpeft.interop.adapterhub.variants import compacter_from_xlpeft, mam_from_xlpeft, parallel_from_xlpeft
from xlpeft.io import Manifest, load_module
from xlpeft.methods.adapters import AdapterConfig

FROM_XLPEFT = {"lora": lora_from_xlpeft, "ia3": ia3_from_xlpeft, "prefix": prefix_from_xlpeft,
               "compacter": compacter_from_xlpeft, "parallel": parallel_from_xlpeft, "mam": mam_from_xlpeft}
"""xlpeft method -> ``(config, tensors, model prefix, adapter name, imported AdapterHub config) -> (config, weights)``."""


def export_adapterhub(src: str | Path, dst: str | Path, name: str | None = None, safetensors: bool = False) -> Path:
    """Write an xlpeft module as an AdapterHub adapter directory loadable by ``load_adapter``.

    Args:
        src: an xlpeft module directory (adapter, lora, ia3, prefix, compacter, parallel or mam).
        dst: the directory to write (replaced if it exists).
        name: the adapter name inside the weights [default: the module's language or task].
        safetensors: write ``adapter.safetensors`` (``load_adapter(..., use_safetensors=True)``)
            instead of ``pytorch_adapter.bin``.

    Raises:
        XlpeftError: a method or option AdapterHub cannot load as the same function (named), or a base
            architecture with no AdapterHub prefix here.
    """
    module = load_module(src)
    if module.manifest.method == "fusion":  # AdapterHub's layout for a fusion: an adapter setup
        from xlpeft.interop.adapterhub.fusion import export_fusion

        return export_fusion(module, dst, safetensors=safetensors)
    dst = check_output_dir(dst, CONFIG_FILE)
    m = module.manifest
    if m.method != "adapter" and m.method not in FROM_XLPEFT:
        raise XlpeftError(f"{src} is a {m.method!r} module; AdapterHub takes {', '.join(['adapter', *FROM_XLPEFT])} "
                          "modules (export sft modules to composable-sft)")
    model_type = m.base.get("model_type", "")
    if model_type not in PREFIXES:
        raise XlpeftError(f"base model type {model_type!r} has no AdapterHub mapping here; known: {', '.join(PREFIXES)}")
    adapter_name = name or m.lang or m.task or Path(src).name
    if not re.fullmatch(r"[^.\s]+", adapter_name):
        raise XlpeftError(f"adapter name {adapter_name!r} should have no dots or spaces (it becomes part of parameter names)")
    imported = m.extra.get("imported") or {}
    from_here = imported.get("format") == "adapterhub"
    prefix = PREFIXES[model_type]
    if m.method == "adapter":
        bn, weights, hidden = _adapter_export(module, imported if from_here else {}, prefix, adapter_name)
    else:
        original = imported.get("config") if from_here and imported.get("method", m.method) == m.method else None
        num_layers = _base_layers(m) if m.method == "lora" and m.config.get("layers") else None
        extra_args = {"num_layers": num_layers} if m.method == "lora" else {}
        bn, weights = FROM_XLPEFT[m.method](m.config, module.tensors, prefix, adapter_name, original, **extra_args)
        hidden = _hidden_of(m.method, module.tensors)
    meta = {"config": bn, "hidden_size": hidden, "model_class": MODEL_CLASSES[model_type],
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


def _adapter_export(module, imported: Mapping[str, Any], prefix: str,
                    adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], int]:
    """A MAD-X adapter module's BnConfig dict, AdapterHub weights and hidden size."""
    config = build(AdapterConfig, module.manifest.config)
    state = module.tensors["adapter"]
    hidden = int(state["layers.0.ffn.down.weight"].shape[1])
    bn = _bn_config_for(config, imported.get("config"))
    scaling = float(imported.get("scaling", 1.0))
    leave_out = [i for i in (imported.get("leave_out") or []) if _is_zero_layer(state, i)]
    bn.update(scaling=scaling, leave_out=leave_out)
    return bn, _foreign_weights(state, prefix, adapter_name, scaling, set(leave_out)), hidden


def _hidden_of(method: str, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    """The base's hidden size H as the module's tensors show it (AdapterHub's ``hidden_size`` check on load)."""
    if "prefix" in tensors:  # prefix, mam: key (L, P, H)
        return int(tensors["prefix"]["key"].shape[2])
    state = tensors[{"parallel": "parallel", "compacter": "compacter", "lora": "lora", "ia3": "ia3"}[method]]
    for key, tensor in sorted(state.items()):
        parts = key.split(".")
        if method == "parallel" and parts[-2:] == ["down", "weight"]:
            return int(tensor.shape[1])  # (m, H)
        if method == "compacter" and parts[-2:] in (["down", "W_left"], ["down", "W"]):
            return int(tensor.shape[0] * tensor.shape[1])  # (n, H/n, ·)
        if method == "lora" and parts[-1] == "lora_A" and parts[2] != "ffn_output":
            return int(tensor.shape[1])  # (r, H)
        if method == "lora" and parts[-1] == "lora_B" and parts[2] == "ffn_output":
            return int(tensor.shape[0])  # (H, r)
        if method == "ia3" and parts[-1] in ("key", "value"):
            return int(tensor.shape[0])  # all_head_size = H
    raise XlpeftError(f"cannot tell the hidden size of this {method} module from its tensors ({', '.join(sorted(state)[:4])})")


def _base_config(m: Manifest) -> Any:
    from transformers import AutoConfig

    from xlpeft.models import resolve_base_dir

    try:
        return AutoConfig.from_pretrained(resolve_base_dir(str(m.base.get("name"))))
    except Exception as exc:  # any failure to find or read the base: say which base and why
        raise XlpeftError(f"cannot read base {m.base.get('name')!r} ({str(exc).splitlines()[0][:200]})") from None


def _base_layers(m: Manifest) -> int | None:
    try:
        return int(_base_config(m).num_hidden_layers)
    except XlpeftError:
        return None


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
    sites = {v: k for k, v in SITES.items()}
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
    meta = {"config": config, "hidden_size": hidden, "model_class": MODEL_CLASSES[model_type],
            "model_name": m.base.get("name"), "model_type": model_type, "name": name, "version": WRITES_VERSION}
    return meta, weights


def _write_weights(dst: Path, weights: Mapping[str, torch.Tensor], filename: str) -> None:
    if filename.endswith(".safetensors"):  # safetensors refuses shared tensors: one copy per name
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}, str(dst / filename))
        return
    copies: dict[int, torch.Tensor] = {}  # a tensor under several names (the prefix pool) is pickled once, as AdapterHub does
    plain = {k: copies.setdefault(id(v), v.detach().to("cpu").contiguous().clone()) for k, v in weights.items()}
    torch.save(plain, dst / filename)  # AdapterHub's own format: a pickled plain state dict
