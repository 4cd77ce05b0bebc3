"""composable-sft SFTs -> xlpeft sft modules -> the same logits as composable-sft's apply; exports; index orders."""

from __future__ import annotations

import io
import shutil

import pytest
import torch

import xlpeft
from tests.interop.conftest import FIXTURES, TOLERANCE, base_dir, expected, max_diff
from xlpeft.errors import XlpeftError
from xlpeft.interop import convert, load_pickled
from xlpeft.interop.composable_sft import FILE, column_to_row, read_sft, row_to_column
from xlpeft.io import Manifest, load_module, save_module
from xlpeft.methods.sft import SparseDelta

CASES = {"lang_bert_diffs": "tiny-bert", "lang_bert_body": "tiny-bert", "lang_xlmr_diffs": "tiny-xlmr",
         "ner_bert_diffs": "tiny-bert"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("composable_sft")
    out = {case: convert(FIXTURES / "composable_sft" / case, root / case, "composable-sft", base=base_dir(kind))
           for case, kind in CASES.items()}
    out["lang_bert_no_head"] = convert(FIXTURES / "composable_sft" / "lang_bert_diffs", root / "no_head",
                                       "composable-sft", base=base_dir("tiny-bert"), without_head=True)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_composable_sft(converted, case):
    model = xlpeft.compose(base_dir(CASES[case]), [converted[case]])
    assert max_diff(model, expected("composable_sft", case)) <= TOLERANCE


def test_language_sft_under_task_sft(converted):
    """composable-sft: lang.apply(model, with_abs=False); task.apply(model). xlpeft: the lang SFT imported --without-head."""
    model = xlpeft.compose(base_dir("tiny-bert"), [converted["lang_bert_no_head"], converted["ner_bert_diffs"]])
    assert max_diff(model, expected("composable_sft", "ner_bert_diffs"), "stack_lang_bert_logits") <= TOLERANCE


def test_manifests(converted):
    lang, task = (load_module(converted[c]).manifest for c in ("lang_bert_diffs", "ner_bert_diffs"))
    assert (lang.kind, lang.method, lang.lang) == ("language", "sft", "lang_bert_diffs")
    assert lang.extra["dense_params"] == ["cls.predictions.bias", "cls.predictions.transform.dense.bias",
                                          "cls.predictions.transform.dense.weight"]
    assert (task.kind, task.extra["head"], task.extra["labels"]) == ("task", "token_classification",
                                                                     ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    assert load_module(converted["lang_bert_no_head"]).manifest.extra["dense_params"] == []


@pytest.mark.parametrize("size", [(7,), (5, 3), (2, 3, 4)])
def test_index_orders(size):
    """composable-sft numbers entries with the first dimension fastest; xlpeft as ``view(-1)`` does."""
    numel = int(torch.tensor(size).prod())
    flat = torch.arange(numel)
    col = row_to_column(flat, size)
    reference = torch.arange(numel).reshape(size[::-1]).permute(*reversed(range(len(size)))).reshape(-1)
    assert torch.equal(col, reference)  # entry i (row-major) sits at column-major position reference[i]
    assert torch.equal(column_to_row(col, size), flat)


def _payload(directory):
    return load_pickled(directory / FILE, numpy_scalars=True)


@pytest.mark.parametrize("case", ["lang_bert_diffs", "lang_bert_body", "ner_bert_diffs"])
def test_export_matches_the_composable_sft_file(converted, tmp_path, case):
    """xlpeft -> composable-sft writes what SFT.save wrote: same parameters, sizes, index steps and values."""
    layout = case.rsplit("_", 1)[1]
    out = convert(converted[case], tmp_path / case, "xlpeft", "composable-sft", base=base_dir("tiny-bert"), layout=layout)
    ours, theirs = _payload(out), _payload(FIXTURES / "composable_sft" / case)
    dense_key = "abs" if layout == "diffs" else "head"
    assert set(ours) == set(theirs)
    assert ours[dense_key].keys() == theirs[dense_key].keys()
    for name, value in theirs[dense_key].items():
        assert torch.allclose(ours[dense_key][name], value, atol=1e-6, rtol=0)
    body = theirs[layout]
    nonempty = {n for n, d in body.items() if (len(d["index_steps"]) if layout == "diffs" else d._nnz())}
    assert set(ours[layout]) == nonempty  # xlpeft keeps no empty entries
    for name in nonempty:
        mine, orig = ours[layout][name], body[name]
        if layout == "diffs":
            assert mine["size"] == orig["size"]
            assert mine["index_steps"] == [int(s) for s in orig["index_steps"]]
            assert all(type(s) is int for s in mine["index_steps"])  # plain ints: loadable with weights_only=True
            assert torch.equal(mine["values"], orig["values"])
        else:
            assert torch.equal(mine.indices(), orig.indices()) and torch.equal(mine.values(), orig.values())
    torch.load(out / FILE, weights_only=True)  # no numpy objects, unlike composable-sft's own files


def test_round_trip_from_xlpeft(tmp_path):
    """An sft module made by xlpeft -> composable-sft -> xlpeft: identical indices and values."""
    base = xlpeft.load_base(base_dir("tiny-bert"))
    gen = torch.Generator().manual_seed(0)
    entries = {}
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.attention.self.query.weight",
                 "bert.encoder.layer.0.output.dense.bias"):
        numel = base.model.get_parameter(name).numel()
        idx = torch.randperm(numel, generator=gen)[: numel // 5]
        entries[name] = (idx, torch.randn(len(idx), generator=gen))
    delta = SparseDelta(entries)
    manifest = Manifest(kind="language", method="sft", lang="sw", config={},
                        base={"name": "tiny", "fingerprint": base.fingerprint, "model_type": "bert"})
    original = save_module(tmp_path / "orig", manifest, {"delta": delta.to_tensors()})
    for layout in ("diffs", "body"):
        foreign = convert(original, tmp_path / f"cs_{layout}", "xlpeft", "composable-sft", base=base, layout=layout)
        back = SparseDelta.from_tensors(load_module(convert(foreign, tmp_path / f"back_{layout}", "composable-sft",
                                                            base=base)).tensors["delta"])
        assert back.entries.keys() == entries.keys()
        for name, (idx, vals) in entries.items():
            order = torch.argsort(idx)
            got_idx, got_vals = back.entries[name]
            got_order = torch.argsort(got_idx)
            assert torch.equal(got_idx[got_order], idx[order]) and torch.equal(got_vals[got_order], vals[order])


def test_numpy_1_pickles_are_read(tmp_path):
    """Older releases were pickled under numpy 1.x, whose scalar reconstructor lives at numpy.core.multiarray."""
    payload = load_pickled(FIXTURES / "composable_sft" / "lang_bert_diffs" / FILE, numpy_scalars=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer, _use_new_zipfile_serialization=False)  # protocol-2 text GLOBALs: easy to rename
    raw = buffer.getvalue()
    assert b"numpy._core.multiarray" in raw
    src = tmp_path / "old"
    src.mkdir()
    (src / FILE).write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    diffs, dense, layout = read_sft(src)
    reference, _, _ = read_sft(FIXTURES / "composable_sft" / "lang_bert_diffs")
    assert layout == "diffs" and diffs.keys() == reference.keys()
    assert all(torch.equal(diffs[n][1], reference[n][1]) for n in diffs)


def test_another_base_is_refused_with_the_parameters_named(tmp_path):
    with pytest.raises(XlpeftError) as info:
        convert(FIXTURES / "composable_sft" / "lang_xlmr_diffs", tmp_path / "x", "composable-sft",
                base=base_dir("tiny-bert"))
    assert "roberta.embeddings.word_embeddings.weight: not a parameter of base" in str(info.value)


def test_unknown_dense_values_and_bad_files_are_refused(tmp_path):
    src = tmp_path / "sft"
    shutil.copytree(FIXTURES / "composable_sft" / "lang_bert_diffs", src)
    payload = _payload(src)
    payload["abs"]["pooler.extra.weight"] = torch.zeros(3)
    torch.save(payload, src / FILE)
    with pytest.raises(XlpeftError, match="pooler.extra.weight: not a parameter"):
        convert(src, tmp_path / "a", "composable-sft", base=base_dir("tiny-bert"))
    payload["abs"] = {"cls.predictions.decoder.weight": torch.zeros(120, 32)}  # tied to the diffed word embeddings
    torch.save(payload, src / FILE)
    with pytest.raises(XlpeftError, match="tied weights"):
        convert(src, tmp_path / "t", "composable-sft", base=base_dir("tiny-bert"))
    torch.save({"weights": torch.zeros(2)}, src / FILE)
    with pytest.raises(XlpeftError, match="'diffs'"):
        convert(src, tmp_path / "b", "composable-sft", base=base_dir("tiny-bert"))
    (src / FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(XlpeftError, match="cannot read"):
        convert(src, tmp_path / "c", "composable-sft", base=base_dir("tiny-bert"))


def test_export_needs_the_modules_base(converted, tmp_path):
    with pytest.raises(XlpeftError, match="--base"):
        convert(converted["lang_bert_diffs"], tmp_path / "a", "xlpeft", "composable-sft")
    with pytest.raises(XlpeftError, match="fingerprint"):
        convert(converted["lang_bert_diffs"], tmp_path / "b", "xlpeft", "composable-sft", base=base_dir("tiny-xlmr"))
    with pytest.raises(XlpeftError, match="composable-sft takes sparse"):
        adapter = convert(FIXTURES / "adapterhub" / "seq_bn", tmp_path / "ad", "adapterhub", base=base_dir("tiny-bert"))
        convert(adapter, tmp_path / "c", "xlpeft", "composable-sft", base=base_dir("tiny-bert"))


@pytest.mark.parametrize("coords", [[[0, 10**6], [0, 1]], [[-1, 0], [0, 1]], [[0, 1], [0, 32]]],
                         ids=["beyond-rows", "negative", "column-overflow"])
def test_cli_convert_refuses_coo_indices_outside_the_tensor(capsys, tmp_path, coords):
    """A sparse COO diff (the earlier `body` layout) whose indices leave its 40 x 32 tensor: one error line, no module."""
    from tests.test_cli import assert_one_error_line, run_cli

    name = "bert.embeddings.position_embeddings.weight"  # 40 x 32 in tiny-bert
    src = tmp_path / "sft"
    src.mkdir()
    bad = torch.sparse_coo_tensor(torch.tensor(coords), torch.tensor([1.0, 2.0]), size=(40, 32), check_invariants=False)
    torch.save({"body": {name: bad}, "head": {}}, src / FILE)
    code, _, err = run_cli(capsys, "convert", str(src), str(tmp_path / "out"), "--from", "composable-sft",
                           "--base", base_dir("tiny-bert"))
    assert_one_error_line(code, err, name, "outside a (40, 32) tensor")
    assert not (tmp_path / "out").exists()
