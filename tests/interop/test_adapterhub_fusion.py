"""AdapterFusion: AdapterHub's adapter-setup layout -> xlpeft fusion modules -> the logits `adapters` 1.3.0 computed, and back.

Fixtures: ``tools/make_interop_fixtures/adapterhub_fusion.py`` (``save_adapter_setup`` of a Fuse block,
the logits of the active setup). The export-back check in AdapterHub itself is
``adapterhub_fusion_exports.py`` + ``adapterhub_fusion.py --check-exports`` (fixtures README).
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import xlpeft
from tests.interop.conftest import FIXTURES, TOLERANCE, base_dir, expected, max_diff
from xlpeft.errors import XlpeftError
from xlpeft.interop import convert, load_pickled
from xlpeft.io import load_module

CASES = {  # fixture -> (kind, config fields it maps onto)
    "fusion_dynamic": ("language", {"query": True, "key": True, "value": True, "regularization": 0.01}),
    "fusion_static_houlsby": ("language", {"value": False, "query_before_ln": True, "regularization": 0.0}),
    "fusion_task": ("task", {"residual_before": True, "value_before_softmax": False}),
}
BERT = base_dir("tiny-bert")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fusion")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fusion_task's Stack note, checked below
        return {case: convert(FIXTURES / "adapterhub" / case, root / case, "adapterhub", base=BERT) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_adapterhub(converted, case):
    key = "fuse_only_logits" if case == "fusion_task" else "logits"
    diff = max_diff(xlpeft.compose(BERT, [converted[case]]), expected("adapterhub", case), key)
    assert diff <= TOLERANCE, f"{case}: max |logits - AdapterHub's| = {diff:.3g}"


def test_stack_of_a_language_adapter_and_a_fusion_matches_adapterhub(converted, tmp_path):
    """AdapterHub's Stack(sw, Fuse(a, b)) is xlpeft's language adapter composed under the fusion task module."""
    sw = convert(FIXTURES / "adapterhub" / "fusion_task" / "sw", tmp_path / "sw", "adapterhub", base=BERT)
    diff = max_diff(xlpeft.compose(BERT, [sw, converted["fusion_task"]]), expected("adapterhub", "fusion_task"))
    assert diff <= TOLERANCE


def test_a_stack_around_the_fuse_block_is_named(tmp_path):
    with pytest.warns(UserWarning, match="the Fuse block sits on sw in this setup; convert .*fusion_task/sw"):
        convert(FIXTURES / "adapterhub" / "fusion_task", tmp_path / "m", "adapterhub", base=BERT)


@pytest.mark.parametrize("case", list(CASES))
def test_manifest_records_the_mapping(converted, case):
    kind, fields = CASES[case]
    m = load_module(converted[case]).manifest
    assert (m.kind, m.method) == (kind, "fusion")
    assert {k: m.config[k] for k in fields} == fields
    setup = json.loads((FIXTURES / "adapterhub" / case / "adapter_setup.json").read_text())
    fuse = setup["adapter_setup"] if setup["adapter_setup"]["type"] == "Fuse" else setup["adapter_setup"]["children"][-1]
    assert [r["name"] for r in m.extra["fused"]] == [c["children"][0] for c in fuse["children"]]
    fusion_keys = {k for k in load_module(converted[case]).tensors["fusion"] if k.startswith("layers.")}
    assert m.trainable_parameters == sum(load_module(converted[case]).tensors["fusion"][k].numel() for k in fusion_keys)
    if kind == "task":
        assert (m.task, m.extra["head"]) == ("pos", "token_classification")


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "expected.safetensors")


@pytest.mark.parametrize("case", list(CASES))
def test_export_writes_adapterhubs_layout(converted, tmp_path, case):
    """The same files, fusion weight names, shapes and values, and the same fusion config, as save_adapter_setup."""
    out = convert(converted[case], tmp_path / "ah", "xlpeft", "adapterhub")
    theirs = FIXTURES / "adapterhub" / case
    ours_files = _files(out)
    theirs_files = [f for f in _files(theirs) if not f.startswith("sw/")]  # the stacked adapter is its own module
    assert ours_files == theirs_files
    (fusion,) = [d.name for d in theirs.iterdir() if "," in d.name]
    mine = load_pickled(out / fusion / "pytorch_model_adapter_fusion.bin")
    ref = load_pickled(theirs / fusion / "pytorch_model_adapter_fusion.bin")
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    our_cfg = json.loads((out / fusion / "adapter_fusion_config.json").read_text())
    ref_cfg = json.loads((theirs / fusion / "adapter_fusion_config.json").read_text())
    assert our_cfg["adapter_names"] == ref_cfg["adapter_names"]
    assert our_cfg["config"] == ref_cfg["config"]
    assert json.loads((out / "adapter_setup.json").read_text())["adapter_setup"]["type"] == "Fuse"


@pytest.mark.parametrize("case", list(CASES))
def test_export_then_import_gives_the_same_logits(converted, tmp_path, case):
    out = convert(converted[case], tmp_path / "ah", "xlpeft", "adapterhub")
    again = convert(out, tmp_path / "again", "adapterhub", base=BERT)
    exp = expected("adapterhub", case)
    key = "fuse_only_logits" if case == "fusion_task" else "logits"
    assert max_diff(xlpeft.compose(BERT, [again]), exp, key) <= TOLERANCE


def _copy(case, tmp_path):
    return shutil.copytree(FIXTURES / "adapterhub" / case, tmp_path / case)


def test_refusals_name_what_cannot_be_read(tmp_path):
    src = _copy("fusion_dynamic", tmp_path)
    cfg_path = src / "tr,id" / "adapter_fusion_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["config"]["temperature"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(XlpeftError, match="temperature=True anneals the softmax"):
        convert(src, tmp_path / "m1", "adapterhub", base=BERT)

    src = _copy("fusion_static_houlsby", tmp_path)
    child = src / "b" / "adapter_config.json"
    meta = json.loads(child.read_text())
    meta["config"]["leave_out"] = [1]
    child.write_text(json.dumps(meta))
    with pytest.raises(XlpeftError, match=r"leave_out \[1\] are not supported"):
        convert(src, tmp_path / "m2", "adapterhub", base=BERT)

    src = _copy("fusion_task", tmp_path)
    setup = json.loads((src / "adapter_setup.json").read_text())
    setup["adapter_setup"]["type"] = "Parallel"
    (src / "adapter_setup.json").write_text(json.dumps(setup))
    with pytest.raises(XlpeftError, match="reads a Fuse block of adapters"):
        convert(src, tmp_path / "m3", "adapterhub", base=BERT)

    src = _copy("fusion_dynamic", tmp_path / "x")
    shutil.rmtree(src / "tr,id")
    with pytest.raises(XlpeftError, match="has no tr,id/adapter_fusion_config.json"):
        convert(src, tmp_path / "m4", "adapterhub", base=BERT)
    assert not any((tmp_path / f"m{i}").exists() for i in range(1, 5)), "nothing half-written"
