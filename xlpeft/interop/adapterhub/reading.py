"""Import: an AdapterHub adapter directory -> an xlpeft module (language, or task with a head).

Bottleneck adapters are read here; the other methods' configs and weights by :data:`TO_XLPEFT`'s
converters (:mod:`.lowrank`, :mod:`.prefix`, :mod:`.variants`). Heads and the manifest are shared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from xlpeft.errors import XlpeftError
from xlpeft.interop import check_output_dir, read_json_object, read_state_dict
from xlpeft.interop.adapterhub.config import (
    CONFIG_FILE,
    HEAD_BIN,
    HEAD_CONFIG_FILE,
    HEAD_KEY,
    HEAD_SAFE,
    INV_KEY,
    LAYER_KEY,
    PARTS,
    SITES,
    WEIGHTS_BIN,
    WEIGHTS_SAFE,
    adapter_config_from,
    resolve_config,
)
from xlpeft.interop.adapterhub.lowrank import ia3_to_xlpeft, lora_to_xlpeft
from xlpeft.interop.adapterhub.prefix import prefix_to_xlpeft
from xlpeft.interop.adapterhub.variants import compacter_to_xlpeft, mam_to_xlpeft, parallel_to_xlpeft
from xlpeft.io import MANIFEST, Manifest, save_module
from xlpeft.methods.adapters import AdapterConfig, AdapterModule

TO_XLPEFT = {"lora": lora_to_xlpeft, "ia3": ia3_to_xlpeft, "prefix": prefix_to_xlpeft, "compacter": compacter_to_xlpeft,
             "parallel": parallel_to_xlpeft, "mam": mam_to_xlpeft}
"""xlpeft method -> ``(AdapterHub config, weights, base geometry, source) -> (config, {stem: state}, adapter name)``."""


def _rename_weights(weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None, set[str]]:
    """AdapterHub parameter names -> xlpeft AdapterModule names; returns (state, adapter name, unexpected keys)."""
    state: dict[str, torch.Tensor] = {}
    names, unexpected = set(), set()
    for key, tensor in weights.items():
        if m := LAYER_KEY.match(key):
            state[f"layers.{m['layer']}.{SITES[m['site']]}.{PARTS[m['part']]}.{m['kind']}"] = tensor
        elif m := INV_KEY.match(key):
            state[f"invertible.{m['block']}.{PARTS[m['part']]}.{m['kind']}"] = tensor
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
        m = HEAD_KEY.match(key)
        if m is None:
            raise XlpeftError(f"{path}: unexpected head weight {key!r} (xlpeft reads flexible heads, heads.NAME.*); "
                              "convert with --without-head to take the adapter alone")
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


def _is_static_head(head_meta: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> bool:
    """A head saved from a static-head model (``BertForMaskedLM`` + ``adapters.init``): no head config, the model's own names."""
    return head_meta.get("config") is None and bool(weights) and not any(HEAD_KEY.match(k) for k in weights)


def _skip_static_head(head_meta: Mapping[str, Any], weights: Mapping[str, torch.Tensor], base: Any, src: Path) -> str:
    """Skip a static model's saved head if it is the base's own frozen head (with a warning); else refuse it.

    ``save_adapter`` writes a static-head model's whole head (e.g. ``cls.predictions.*``) next to the
    adapter. Unchanged, it is the base's own head, which xlpeft keeps frozen and never stores in modules.

    Raises:
        XlpeftError: the head differs from the base's (trained, or from another base); names the tensors.
    """
    import warnings

    from xlpeft.models import load_base

    own = (base if hasattr(base, "model") else load_base(str(base))).model.state_dict()
    differ = [k for k, v in sorted(weights.items())
              if k not in own or own[k].shape != v.shape or not torch.equal(own[k].detach().cpu(), v.to(own[k].dtype))]
    model_class = head_meta.get("model_class") or "a static-head model"
    if differ:
        raise XlpeftError(
            f"{src}: the saved head of {model_class} ({len(weights)} tensors) is not the base's own: "
            f"{', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''} differ or are missing (was the head trained, "
            "or saved from another base?); xlpeft keeps the base's head frozen, so convert with --without-head "
            "to take the adapter alone"
        )
    note = f"the {model_class} head saved with the adapter ({len(weights)} tensors) equals the base's own; skipped"
    warnings.warn(f"{src}: {note}", stacklevel=3)
    return note


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
    """Convert an AdapterHub adapter directory into an xlpeft module at ``dst`` (its method from the config).

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
    src = Path(src)
    if (src / "adapter_setup.json").is_file() and not (src / CONFIG_FILE).is_file():  # save_adapter_setup: a Fuse block
        from xlpeft.interop.adapterhub.fusion import import_fusion

        return import_fusion(src, dst, base, name=name, without_head=without_head)
    dst = check_output_dir(dst, MANIFEST)
    if not (src / CONFIG_FILE).is_file():
        raise XlpeftError(f"{src} has no {CONFIG_FILE}; is it an AdapterHub adapter directory?")
    meta = read_json_object(src / CONFIG_FILE)
    method, hub_config = resolve_config(meta.get("config"))
    base_ref, base_config = _base_info(base)
    num_layers, hidden = int(base_config.num_hidden_layers), int(base_config.hidden_size)
    problems = []
    if meta.get("model_type") and meta["model_type"] != base_ref["model_type"]:
        problems.append(f"the adapter was trained on a {meta['model_type']!r} model but the base is {base_ref['model_type']!r}")
    if meta.get("hidden_size") and int(meta["hidden_size"]) != hidden:
        problems.append(f"the adapter has hidden size {meta['hidden_size']} but the base has {hidden}")
    if problems:
        raise XlpeftError(f"{src} does not fit base {base_ref['name']!r}: " + "; ".join(problems))
    weights = read_state_dict(src, WEIGHTS_SAFE, WEIGHTS_BIN, "is it an AdapterHub adapter directory?")
    if method == "adapter":
        bn = hub_config
        config = adapter_config_from(bn, num_layers, versioned="version" in meta)
        state, weight_name, unexpected = _rename_weights(weights)
        if unexpected:
            raise XlpeftError(f"{src}: weights xlpeft cannot place: {', '.join(sorted(unexpected)[:6])}")
        tensors: dict[str, dict[str, torch.Tensor]] = {"adapter": _complete(state, config, bn, hidden, num_layers, src)}
        mapping = {"scaling": float(bn["scaling"]), "leave_out": sorted(bn["leave_out"] or [])}
    else:
        geometry = {"num_layers": num_layers, "hidden": hidden, "heads": int(base_config.num_attention_heads),
                    "intermediate": int(base_config.intermediate_size)}
        config, tensors, weight_name = TO_XLPEFT[method](hub_config, weights, geometry, src)
        mapping = {}
    adapter_name = name or meta.get("name") or weight_name or src.name

    head, skipped = None, None
    if (src / HEAD_CONFIG_FILE).is_file() and not without_head:
        head_meta = read_json_object(src / HEAD_CONFIG_FILE)
        head_weights = read_state_dict(src, HEAD_SAFE, HEAD_BIN, "is it an AdapterHub adapter directory?")
        if _is_static_head(head_meta, head_weights):
            skipped = _skip_static_head(head_meta, head_weights, base, src)
        else:
            head = _head_from(head_meta, head_weights, src)
    imported = {"format": "adapterhub", "source": str(src), "adapter_name": meta.get("name") or weight_name,
                "version": meta.get("version"), "config": hub_config, **mapping}
    if skipped:
        imported["head_skipped"] = skipped
    extra: dict[str, Any] = {"imported": imported}
    kind = "language"
    if head is not None:
        kind, (head_kind, labels, head_state) = "task", head
        tensors["head"] = head_state
        dropout = (head_meta.get("config") or {}).get("dropout_prob")
        extra.update(labels=labels, head=head_kind, head_dropout=0.1 if dropout is None else float(dropout))
    manifest = Manifest(
        kind=kind, method=method, base=base_ref, config=asdict(config),
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
