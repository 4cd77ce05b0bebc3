"""Corrupted or mismatched modules are refused on load/activation with a clear error, never half-applied."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from xlpeft.compose import activate
from xlpeft.composed import check_head
from xlpeft.errors import XlpeftError
from xlpeft.io import Manifest, load_module, save_module
from xlpeft.methods.adapters import AdapterConfig, AdapterModule
from xlpeft.methods.heads import build_head
from xlpeft.methods.sft import SparseDelta


def _adapter_module(tmp_path, base, hidden=None, name="m"):
    module = AdapterModule(AdapterConfig(invertible=False), hidden or base.hidden_size, len(base.layers))
    manifest = Manifest(kind="language", method="adapter", lang="sw", config={"invertible": False},
                        base={"name": base.name, "fingerprint": base.fingerprint, "model_type": "x"})
    return save_module(tmp_path / name, manifest, {"adapter": module.state_dict()})


def test_wrong_shapes_are_refused(tmp_path, base):
    path = _adapter_module(tmp_path, base, hidden=base.hidden_size * 2)
    with pytest.raises(XlpeftError, match="do not fit this base"):
        activate(base, [load_module(path)])


def test_wrong_dtype_is_refused(tmp_path, base):
    path = _adapter_module(tmp_path, base)
    state = load_file(str(path / "adapter.safetensors"))
    state["layers.0.ffn.up.weight"] = state["layers.0.ffn.up.weight"].to(torch.int32)
    save_file(state, str(path / "adapter.safetensors"))
    with pytest.raises(XlpeftError, match="wrong dtype.*int32"):
        load_module(path)


def test_out_of_range_sparse_indices_are_refused_and_nothing_is_applied(base):
    params = dict(base.model.named_parameters())
    first, second = f"{base.arch.encoder}.encoder.layer.0.output.dense.weight", f"{base.arch.encoder}.encoder.layer.1.output.dense.weight"
    before = params[first].detach().clone()
    good = (torch.tensor([0, 1]), torch.ones(2))
    bad = (torch.tensor([params[second].numel() + 5]), torch.ones(1))
    with pytest.raises(XlpeftError, match="indices span"):
        SparseDelta({first: good, second: bad}).apply(base.model)
    assert torch.equal(params[first].detach(), before), "a refused delta changes nothing"


def test_wrong_base_is_refused(tmp_path, base, base_dirs):
    from xlpeft.models import load_base

    path = _adapter_module(tmp_path, base)
    other = load_base(str(base_dirs["tiny-xlmr" if base.arch.encoder == "bert" else "tiny-bert"]))
    with pytest.raises(XlpeftError, match="fingerprint"):
        activate(other, [load_module(path)])


def test_head_that_does_not_fit_is_refused(tmp_path, base):
    head = build_head("token_classification", base.hidden_size, 3)
    manifest = Manifest(kind="task", method="adapter", task="ner", config={}, extra={"labels": ["O", "B-PER"],
                        "head": "token_classification"}, base={"name": "b", "fingerprint": base.fingerprint})
    path = save_module(tmp_path / "t", manifest, {"head": head.state_dict()})
    with pytest.raises(XlpeftError, match="2 labels.*classifier.weight"):
        check_head(load_module(path), base.hidden_size)


def test_truncated_manifest_is_refused(tmp_path, base):
    path = _adapter_module(tmp_path, base)
    (path / "xlpeft.json").write_text(json.dumps({"format_version": 1, "kind": "language"}))
    with pytest.raises(XlpeftError, match="incomplete"):
        load_module(path)
