"""AdapterFusion in AdapterHub's layout <-> xlpeft fusion modules (:mod:`xlpeft.methods.fusion`).

AdapterHub writes a fusion with ``save_adapter_setup(DIR, Fuse("a", "b"), head_setup="pos")``:
``adapter_setup.json`` (the composition: ``{"adapter_setup": {"type": "Fuse", "children": [...]},
"head_setup": "pos"}``), one adapter directory per fused adapter (``a/``, ``b/``), the fusion layer
in ``a,b/`` (``adapter_fusion_config.json`` + ``pytorch_model_adapter_fusion.bin``, keys
``<prefix>.encoder.layer.<i>.<site>.adapter_fusion_layer.a,b.{query,key,value}.*``) and the head in
``pos/``. ``load_adapter_setup`` reads it back. A Stack around the Fuse block (``Stack(sw, Fuse(a,
b))``) is read too: the fusion module is the Fuse block, and the other adapters are named so they
can be converted and composed under it.

Refused by name: ``temperature`` (AdapterHub anneals a softmax temperature by one step per forward
call, training and inference alike, so its function depends on how often it has been called), and
fused adapters with ``leave_out`` layers (AdapterHub's attention then leaves them out of the softmax
where xlpeft's identity layers would enter it).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from xlpeft.errors import XlpeftError
from xlpeft.interop import check_output_dir, read_json_object, read_state_dict
from xlpeft.interop.adapterhub.config import (
    HEAD_BIN,
    HEAD_CONFIG_FILE,
    HEAD_SAFE,
    MODEL_CLASSES,
    PREFIXES,
    SITES,
    WRITES_VERSION,
)
from xlpeft.io import MANIFEST, LoadedModule, Manifest, load_module, save_module
from xlpeft.methods.fusion import STEM, FusionConfig

SETUP_FILE = "adapter_setup.json"
FUSION_CONFIG_FILE, FUSION_BIN, FUSION_SAFE = ("adapter_fusion_config.json", "pytorch_model_adapter_fusion.bin",
                                               "model_adapter_fusion.safetensors")
FUSION_KEY = re.compile(r"^(?:\w+\.)?encoder\.layer\.(?P<layer>\d+)\.(?P<site>attention\.output|output)\."
                        r"adapter_fusion_layer\.(?P<name>[^.]+)\.(?P<part>query|key|value)\.(?P<kind>weight|bias)$")
FLAGS = ("query", "key", "value", "value_before_softmax", "query_before_ln", "residual_before")


def _names(node: dict[str, Any], src: Path) -> tuple[list[str], list[str]]:
    """(the fused adapters, the adapters stacked under the Fuse block) of an ``adapter_setup`` tree."""
    kind = node.get("type")
    singles = [c["children"][0] for c in node.get("children", []) if c.get("type") == "single"]
    if kind == "Fuse" and len(singles) == len(node["children"]):
        return singles, []
    if kind == "Stack":
        fuses = [c for c in node.get("children", []) if c.get("type") == "Fuse"]
        if len(fuses) == 1 and node["children"][-1] is fuses[0] and len(singles) == len(node["children"]) - 1:
            return _names(fuses[0], src)[0], singles
    raise XlpeftError(f"{src / SETUP_FILE}: xlpeft reads a Fuse block of adapters, alone or on top of a Stack of "
                      f"adapters; got {json.dumps(node)[:200]}")


def fusion_config_from(raw: dict[str, Any], src: Path) -> dict[str, Any]:
    """AdapterHub's ``AdapterFusionConfig`` dict -> :class:`FusionConfig` fields (``fuse`` left to the caller)."""
    if raw.get("temperature"):
        raise XlpeftError(f"{src}: temperature=True anneals the softmax by one step per forward call, so the fusion's "
                          "function depends on how often it was called; xlpeft cannot reproduce it")
    missing = [k for k in (*FLAGS, "value_initialized", "regularization") if k not in raw]
    if missing:
        raise XlpeftError(f"{src}: the fusion config lacks {', '.join(missing)}; is it an AdapterHub 1.x fusion?")
    dropout = raw.get("dropout_prob")
    return {**{k: bool(raw[k]) for k in FLAGS}, "value_initialized": bool(raw["value_initialized"]),
            "regularization": 0.01 if raw["regularization"] else 0.0, "dropout": None if dropout is None else float(dropout)}


def import_fusion(src: str | Path, dst: str | Path, base: Any, name: str | None = None,
                  without_head: bool = False) -> Path:
    """Convert an AdapterHub adapter setup with a Fuse block (``save_adapter_setup``) into an xlpeft fusion module.

    Each fused adapter is converted as :func:`~xlpeft.interop.adapterhub.import_adapterhub` does and
    carried inside the fusion module; the setup's head, if any, makes it a task module.
    """
    from xlpeft.interop.adapterhub.reading import _base_info, _head_from, import_adapterhub

    src, dst = Path(src), check_output_dir(dst, MANIFEST)
    setup = read_json_object(src / SETUP_FILE)
    fused_names, stacked = _names(setup.get("adapter_setup") or {}, src)
    fusion_name = ",".join(fused_names)
    fusion_dir = src / fusion_name
    if not (fusion_dir / FUSION_CONFIG_FILE).is_file():
        raise XlpeftError(f"{src} has no {fusion_name}/{FUSION_CONFIG_FILE}; is it written by save_adapter_setup?")
    meta = read_json_object(fusion_dir / FUSION_CONFIG_FILE)
    fields = fusion_config_from(meta.get("config") or {}, fusion_dir)
    base_ref, _ = _base_info(base)
    records, tensors = [], {}
    with tempfile.TemporaryDirectory(prefix="xlpeft-fusion-") as tmp:
        for i, child in enumerate(fused_names):
            bn = (read_json_object(src / child / "adapter_config.json").get("config") or {})
            if bn.get("leave_out"):
                raise XlpeftError(f"{src / child}: fused adapters with leave_out {bn['leave_out']} are not supported "
                                  "(AdapterHub leaves them out of the fusion softmax there; xlpeft would not)")
            loaded = load_module(import_adapterhub(src / child, Path(tmp) / child, base, without_head=True))
            m = loaded.manifest
            (own,) = loaded.tensors.values()
            tensors.update({f"fused.{i}.{k}": v for k, v in own.items()})
            records.append({"source": str(src / child), "kind": m.kind, "method": m.method, "name": child,
                            "config": m.config, "imported": m.extra.get("imported")})
    weights = read_state_dict(fusion_dir, FUSION_SAFE, FUSION_BIN, "is it an AdapterHub fusion directory?")
    state = {}
    for key, tensor in weights.items():
        found = FUSION_KEY.match(key)
        if found is None or found["name"] != fusion_name:
            raise XlpeftError(f"{fusion_dir}: unexpected fusion weight {key!r}")
        state[f"layers.{found['layer']}.{SITES[found['site']]}.{found['part']}.{found['kind']}"] = tensor
    tensors = {STEM: {**state, **tensors}}
    head, head_dropout = None, None
    head_name = setup.get("head_setup")
    if head_name and not without_head:
        if not isinstance(head_name, str):
            raise XlpeftError(f"{src / SETUP_FILE}: head_setup {head_name!r}: xlpeft reads one head")
        head_meta = read_json_object(src / head_name / HEAD_CONFIG_FILE)
        head = _head_from(head_meta, read_state_dict(src / head_name, HEAD_SAFE, HEAD_BIN, "is the head saved?"),
                          src / head_name)
        head_dropout = (head_meta.get("config") or {}).get("dropout_prob")
    config = FusionConfig(fuse=",".join(r["source"] for r in records), **fields)
    kind, module_name = ("task", name or head_name) if head is not None else ("language", name or fusion_name)
    extra: dict[str, Any] = {"fused": records, "imported": {"format": "adapterhub", "source": str(src),
                                                            "fusion_name": fusion_name, "stacked_under": stacked,
                                                            "version": meta.get("version")}}
    if head is not None:
        head_kind, labels, tensors["head"] = head
        extra.update(labels=labels, head=head_kind, head_dropout=0.1 if head_dropout is None else float(head_dropout))
    manifest = Manifest(kind=kind, method="fusion", base=base_ref, config=asdict(config),
                        lang=module_name if kind == "language" else None, task=module_name if kind == "task" else None,
                        trainable_parameters=sum(t.numel() for t in state.values()), extra=extra)
    _check_fits(LoadedModule(manifest, tensors, dst), base)  # the weights must fit, strictly, before anything is written
    out = save_module(dst, manifest, tensors)
    if stacked:
        warnings.warn(f"{src}: the Fuse block sits on {', '.join(stacked)} in this setup; convert "
                      f"{' and '.join(str(src / s) for s in stacked)} too and compose them under {dst}", stacklevel=2)
    return out


def _check_fits(module: LoadedModule, base: Any) -> None:
    """Rebuild the fusion module on the base: weights that do not fit its layers fail here, by name."""
    from xlpeft.methods.fusion import build_fusion
    from xlpeft.models import Base, load_base

    build_fusion(base if isinstance(base, Base) else load_base(str(base)), module)


def export_fusion(module: LoadedModule, dst: str | Path, safetensors: bool = False) -> Path:
    """Write a loaded xlpeft fusion module as an AdapterHub adapter setup (``load_adapter_setup`` reads it)."""
    from xlpeft.interop.adapterhub.writing import _foreign_head, _write_weights, export_adapterhub

    dst = check_output_dir(dst, SETUP_FILE)
    m = module.manifest
    model_type = m.base.get("model_type", "")
    if model_type not in PREFIXES:
        raise XlpeftError(f"base model type {model_type!r} has no AdapterHub mapping here; known: {', '.join(PREFIXES)}")
    records = m.extra.get("fused") or []
    names = [r["name"] for r in records]
    if len(set(names)) < len(names) or any(not re.fullmatch(r"[^.,\s]+", n) for n in names):
        names = [f"{re.sub(r'[^A-Za-z0-9_-]', '_', n)}_{i}" for i, n in enumerate(names)]
    fusion_name = ",".join(names)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    from xlpeft.methods.fusion import fused_modules

    with tempfile.TemporaryDirectory(prefix="xlpeft-fusion-") as tmp:
        for child_name, child, rec in zip(names, fused_modules(module), records, strict=True):
            child.manifest.extra["imported"] = rec.get("imported") or {}
            path = save_module(Path(tmp) / child_name, child.manifest, child.tensors)
            export_adapterhub(path, dst / child_name, name=child_name, safetensors=safetensors)
    config = asdict(_config(m))
    hub = {**{k: config[k] for k in FLAGS}, "value_initialized": config["value_initialized"],
           "regularization": config["regularization"] > 0, "temperature": False, "dropout_prob": config["dropout"]}
    prefix = PREFIXES[model_type]
    site_path = {v: k for k, v in SITES.items()}
    weights = {}
    for key, tensor in module.tensors[STEM].items():
        if not key.startswith("layers."):
            continue  # a fused module's weights, written to its own directory above
        _, layer, site, part, kind = key.split(".")
        weights[f"{prefix}.encoder.layer.{layer}.{site_path[site]}.adapter_fusion_layer.{fusion_name}.{part}.{kind}"] = tensor
    hidden = int(next(v for k, v in module.tensors[STEM].items() if k.startswith("layers.")).shape[-1])
    meta = {"adapter_names": names, "config": hub, "hidden_size": hidden, "model_class": MODEL_CLASSES[model_type],
            "model_name": m.base.get("name"), "model_type": model_type, "name": fusion_name, "version": WRITES_VERSION}
    (dst / fusion_name).mkdir()
    (dst / fusion_name / FUSION_CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _write_weights(dst / fusion_name, weights, FUSION_SAFE if safetensors else FUSION_BIN)
    head_name = None
    if m.kind == "task" and "head" in module.tensors:
        head_name = m.task or "head"
        head_meta, head_weights = _foreign_head(m, module.tensors["head"], head_name, hidden)
        (dst / head_name).mkdir()
        (dst / head_name / HEAD_CONFIG_FILE).write_text(json.dumps(head_meta, indent=2, sort_keys=True) + "\n",
                                                        encoding="utf-8")
        _write_weights(dst / head_name, head_weights, HEAD_SAFE if safetensors else HEAD_BIN)
    setup = {"adapter_setup": {"type": "Fuse", "children": [{"type": "single", "children": [n]} for n in names]},
             "head_setup": head_name, "version": WRITES_VERSION}
    (dst / SETUP_FILE).write_text(json.dumps(setup, indent=2) + "\n", encoding="utf-8")
    return dst


def _config(m: Manifest) -> FusionConfig:
    from xlpeft.config import build

    return build(FusionConfig, m.config)
