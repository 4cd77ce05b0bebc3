"""Export: an xlpeft adapter module -> an AdapterHub directory that ``load_adapter`` reads."""

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
from xlpeft.io import Manifest, load_module
from xlpeft.methods.adapters import AdapterConfig


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
    dst = check_output_dir(dst, CONFIG_FILE)
    module = load_module(src)
    m = module.manifest
    if m.method != "adapter":
        raise XlpeftError(f"{src} is a {m.method!r} module; AdapterHub takes adapters (export sft modules to composable-sft)")
    model_type = m.base.get("model_type", "")
    if model_type not in PREFIXES:
        raise XlpeftError(f"base model type {model_type!r} has no AdapterHub mapping here; known: {', '.join(PREFIXES)}")
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
    prefix = PREFIXES[model_type]
    weights = _foreign_weights(state, prefix, adapter_name, scaling, set(leave_out))
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
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
    if filename.endswith(".safetensors"):
        save_file(plain, str(dst / filename))
    else:
        torch.save(plain, dst / filename)  # AdapterHub's own format: a pickled plain state dict
