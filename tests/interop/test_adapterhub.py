"""AdapterHub adapters -> xlpeft -> the same logits as `adapters` 1.3.0; exports that match its files; refusals."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

import xlpeft
from tests.interop.conftest import FIXTURES, TOLERANCE, base_dir, expected, max_diff
from xlpeft.errors import XlpeftError
from xlpeft.interop import convert, load_pickled
from xlpeft.interop.adapterhub import PRESETS
from xlpeft.io import Manifest, load_module, save_module
from xlpeft.methods.adapters import AdapterConfig, AdapterModule

CASES = {  # fixture -> (base, kind, xlpeft config it maps onto)
    "seq_bn": ("tiny-bert", "language", dict(placement="pfeiffer", invertible=False, non_linearity="relu")),
    "seq_bn_inv": ("tiny-bert", "language", dict(placement="pfeiffer", invertible=True, inv_reduction_factor=2.0)),
    "double_seq_bn": ("tiny-bert", "language", dict(placement="houlsby", invertible=False, non_linearity="swish")),
    "double_seq_bn_inv": ("tiny-bert", "language", dict(placement="houlsby", invertible=True)),
    "seq_bn_options": ("tiny-bert", "language", dict(placement="pfeiffer", reduction_factor=8.0, non_linearity="gelu")),
    "xlmr_seq_bn_inv": ("tiny-xlmr", "language", dict(placement="pfeiffer", invertible=True, inv_reduction_factor=4.0)),
    "ner_seq_bn": ("tiny-bert", "task", dict(placement="pfeiffer", invertible=False)),
    "nli_double_seq_bn": ("tiny-xlmr", "task", dict(placement="houlsby", invertible=False)),
}


def check(case: str, diff: float) -> None:
    assert diff <= TOLERANCE, f"{case}: max |logits - AdapterHub's| = {diff:.3g}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapterhub")
    return {case: convert(FIXTURES / "adapterhub" / case, root / case, "adapterhub", base=base_dir(kind))
            for case, (kind, _, _) in CASES.items()}


def test_bases_agree_with_the_generating_transformers():
    """The fixture bases (written by transformers 4.57) give the same bare logits here, so diffs come from adapters."""
    for case, kind in (("seq_bn", "tiny-bert"), ("xlmr_seq_bn_inv", "tiny-xlmr")):
        assert max_diff(xlpeft.load_base(base_dir(kind)).model, expected("adapterhub", case), "base_logits") < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_adapterhub(converted, case):
    kind = CASES[case][0]
    check(case, max_diff(xlpeft.compose(base_dir(kind), [converted[case]]), expected("adapterhub", case)))


@pytest.mark.parametrize("lang", ["seq_bn", "seq_bn_inv"])
def test_madx_stack_matches_adapterhub_stack(converted, lang):
    """Language adapter under the NER task adapter: AdapterHub's Stack(lang, task) and xlpeft's composition."""
    model = xlpeft.compose(base_dir("tiny-bert"), [converted[lang], converted["ner_seq_bn"]])
    check(lang, max_diff(model, expected("adapterhub", "ner_seq_bn"), f"stack_{lang}_logits"))


@pytest.mark.parametrize("case", list(CASES))
def test_manifest_records_the_mapping(converted, case):
    _, kind, config = CASES[case]
    m = load_module(converted[case]).manifest
    assert (m.kind, m.method) == (kind, "adapter")
    assert {k: m.config[k] for k in config} == config
    assert m.extra["imported"]["format"] == "adapterhub"
    assert m.base["fingerprint"] == xlpeft.load_base(base_dir(CASES[case][0])).fingerprint
    if case == "ner_seq_bn":
        assert (m.task, m.extra["head"], m.extra["labels"]) == ("ner", "token_classification",
                                                               ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    if case == "nli_double_seq_bn":
        assert (m.extra["head"], m.extra["labels"]) == ("sequence_classification", ["entailment", "neutral", "contradiction"])
    if kind == "language":
        assert m.lang in ("sw", "yo")


def _foreign(directory, safe, binary):
    return load_file(str(directory / safe)) if (directory / safe).is_file() else load_pickled(directory / binary)


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_the_adapterhub_files(converted, tmp_path, case):
    """xlpeft -> AdapterHub writes what `save_adapter` wrote: same config, same weight names and values, same head."""
    src, out = FIXTURES / "adapterhub" / case, convert(converted[case], tmp_path / case, "xlpeft", "adapterhub")
    ours, theirs = (json.loads((d / "adapter_config.json").read_text()) for d in (out, src))
    assert ours["config"] == theirs["config"]
    assert {k: ours[k] for k in ("hidden_size", "model_class", "model_type", "name")} == \
           {k: theirs[k] for k in ("hidden_size", "model_class", "model_type", "name")}
    assert (out / "pytorch_adapter.bin").is_file()
    mine, orig = (_foreign(d, "adapter.safetensors", "pytorch_adapter.bin") for d in (out, src))
    assert mine.keys() == orig.keys()
    assert all(torch.equal(mine[k], orig[k]) for k in orig)
    if (src / "head_config.json").is_file():
        ours, theirs = (json.loads((d / "head_config.json").read_text()) for d in (out, src))
        assert {k: v for k, v in ours["config"].items() if k != "dropout_prob"} == \
               {k: v for k, v in theirs["config"].items() if k != "dropout_prob"}
        mine, orig = (load_pickled(d / "pytorch_model_head.bin") for d in (out, src))
        assert mine.keys() == orig.keys() and all(torch.equal(mine[k], orig[k]) for k in orig)


def test_safetensors_export(converted, tmp_path):
    out = convert(converted["double_seq_bn"], tmp_path / "st", "xlpeft", "adapterhub", safetensors=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


@pytest.mark.parametrize("placement, invertible, head", [("pfeiffer", True, None), ("houlsby", False, "token_classification"),
                                                          ("houlsby", True, "sequence_classification")])
def test_round_trip_from_xlpeft(tmp_path, placement, invertible, head):
    """A module trained by xlpeft -> AdapterHub -> xlpeft: identical tensors, config and labels."""
    base = xlpeft.load_base(base_dir("tiny-bert"))
    config = AdapterConfig(placement=placement, reduction_factor=4.0, non_linearity="gelu", invertible=invertible)
    torch.manual_seed(0)
    module = AdapterModule(config, base.hidden_size, len(base.layers))
    state = {k: torch.randn_like(v) for k, v in module.state_dict().items()}
    tensors, extra, kind = {"adapter": state}, {}, "language"
    if head:
        kind = "task"
        tensors["head"] = {"classifier.weight": torch.randn(3, 32), "classifier.bias": torch.randn(3)}
        if head == "sequence_classification":
            tensors["head"] |= {"dense.weight": torch.randn(32, 32), "dense.bias": torch.randn(32)}
        extra = {"labels": ["a", "b", "c"], "head": head, "head_dropout": 0.1}
    manifest = Manifest(kind=kind, method="adapter", lang="sw" if kind == "language" else None,
                        task="pos" if head else None, config=asdict(config),
                        base={"name": "tiny", "fingerprint": base.fingerprint, "model_type": "bert"}, extra=extra)
    original = save_module(tmp_path / "orig", manifest, tensors)
    foreign = convert(original, tmp_path / "ah", "xlpeft", "adapterhub")
    back = load_module(convert(foreign, tmp_path / "back", "adapterhub", base=base))
    assert back.manifest.config == load_module(original).manifest.config
    assert back.manifest.kind == kind and back.manifest.extra.get("labels") == extra.get("labels")
    for stem, tensors_ in tensors.items():
        assert back.tensors[stem].keys() == tensors_.keys()
        assert all(torch.equal(back.tensors[stem][k], tensors_[k]) for k in tensors_)


def _with_config(tmp_path, config, version=True):
    """The seq_bn fixture with adapter_config.json's `config` replaced."""
    target = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "adapterhub" / "seq_bn", target)
    meta = json.loads((target / "adapter_config.json").read_text())
    meta["config"] = config
    if not version:
        meta.pop("version")
    (target / "adapter_config.json").write_text(json.dumps(meta))
    return target


@pytest.mark.parametrize(
    "config, needles",
    [
        ({"architecture": "prompt_tuning", "prompt_length": 10}, ["'prompt_tuning'", "lora", "prefix_tuning"]),
        ({"architecture": "reft", "r": 1}, ["'reft'"]),
        ({"architecture": "union", "configs": [{"architecture": "lora"}, {"architecture": "prefix_tuning"}]},
         ["'union'", "'lora', 'prefix_tuning'", "MAM"]),
        ("prompt_tuning", ["'prompt_tuning'", "seq_bn"]),
        ("vera", ["'vera'"]),
        (PRESETS["seq_bn"] | {"ln_after": True}, ["ln_after=True"]),
        (PRESETS["seq_bn"] | {"residual_before_ln": False}, ["residual_before_ln=False"]),
        (PRESETS["seq_bn"] | {"is_parallel": True, "scaling": "learned"}, ["original_ln_before=True", "scaling='learned'"]),
        (PRESETS["seq_bn"] | {"phm_layer": True, "shared_W_phm": True}, ["shared_W_phm=True"]),
        (PRESETS["seq_bn_inv"] | {"inv_adapter": "glow"}, ["inv_adapter='glow'", "NICE"]),
        (PRESETS["seq_bn"] | {"non_linearity": "gelu_new"}, ["non_linearity='gelu_new'"]),
        (PRESETS["seq_bn"] | {"mh_adapter": True}, ["mh_adapter=True"]),
        (PRESETS["seq_bn"] | {"reduction_factor": {"0": 4, "1": 8}}, ["reduction_factor", "one bottleneck width"]),
    ],
)
def test_unsupported_configs_are_refused_by_name(tmp_path, config, needles):
    with pytest.raises(XlpeftError) as info:
        convert(_with_config(tmp_path, config), tmp_path / "out", "adapterhub", base=base_dir("tiny-bert"))
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert not (tmp_path / "out").exists()


def test_old_configs_read_gelu_as_gelu_new(tmp_path):
    """Configs saved before adapters wrote a `version` meant gelu_new by `gelu`; xlpeft has no gelu_new."""
    src = _with_config(tmp_path, PRESETS["seq_bn"] | {"non_linearity": "gelu", "reduction_factor": 4}, version=False)
    with pytest.raises(XlpeftError, match="gelu_new"):
        convert(src, tmp_path / "out", "adapterhub", base=base_dir("tiny-bert"))


def test_preset_names_and_v1_invertible_config(tmp_path):
    """A config given by name, and the v1 nested `invertible_adapter` entry, resolve to the same module."""
    src = _with_config(tmp_path, {**{k: v for k, v in PRESETS["seq_bn"].items()}, "reduction_factor": 4,
                                  "invertible_adapter": {"block_type": "nice", "reduction_factor": 2}})
    shutil.copy(FIXTURES / "adapterhub" / "seq_bn_inv" / "pytorch_adapter.bin", src / "pytorch_adapter.bin")
    m = load_module(convert(src, tmp_path / "out", "adapterhub", base=base_dir("tiny-bert"))).manifest
    assert m.config["invertible"] and m.config["inv_reduction_factor"] == 2.0
    src2 = _with_config(tmp_path / "x", "pfeiffer")
    with pytest.raises(XlpeftError, match="do not fit"):  # rf 16 from the preset: width 2, the weights have 8
        convert(src2, tmp_path / "out2", "adapterhub", base=base_dir("tiny-bert"))


def test_weights_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(XlpeftError, match="'bert' model but the base is 'xlm-roberta'"):
        convert(FIXTURES / "adapterhub" / "seq_bn", tmp_path / "a", "adapterhub", base=base_dir("tiny-xlmr"))
    src = tmp_path / "broken"
    shutil.copytree(FIXTURES / "adapterhub" / "seq_bn", src)
    state = load_pickled(src / "pytorch_adapter.bin")
    state.pop("bert.encoder.layer.1.output.adapters.sw.adapter_up.weight")
    state["bert.encoder.layer.0.output.adapters.sw.adapter_norm_after.weight"] = torch.ones(32)
    torch.save(state, src / "pytorch_adapter.bin")
    with pytest.raises(XlpeftError, match="adapter_norm_after"):
        convert(src, tmp_path / "b", "adapterhub", base=base_dir("tiny-bert"))
    state.pop("bert.encoder.layer.0.output.adapters.sw.adapter_norm_after.weight")
    torch.save(state, src / "pytorch_adapter.bin")
    with pytest.raises(XlpeftError, match="layers.1.ffn.up.weight"):
        convert(src, tmp_path / "c", "adapterhub", base=base_dir("tiny-bert"))


def test_unsupported_head_is_refused_unless_left_out(tmp_path):
    src = tmp_path / "ner"
    shutil.copytree(FIXTURES / "adapterhub" / "ner_seq_bn", src)
    meta = json.loads((src / "head_config.json").read_text())
    meta["config"]["layers"] = 2
    (src / "head_config.json").write_text(json.dumps(meta))
    with pytest.raises(XlpeftError, match="--without-head"):
        convert(src, tmp_path / "a", "adapterhub", base=base_dir("tiny-bert"))
    m = load_module(convert(src, tmp_path / "b", "adapterhub", base=base_dir("tiny-bert"), without_head=True)).manifest
    assert (m.kind, m.lang) == ("language", "ner")


def test_static_head_equal_to_the_base_is_skipped(tmp_path):
    """BertForMaskedLM + adapters.init + save_adapter writes the model's own MLM head (cls.predictions.*): skip it, say so."""
    src = FIXTURES / "adapterhub" / "static_head_seq_bn"
    with pytest.warns(UserWarning, match="head saved with the adapter .* equals the base's own; skipped"):
        out = convert(src, tmp_path / "m", "adapterhub", base=base_dir("tiny-bert"))
    module = load_module(out)
    assert (module.manifest.kind, module.manifest.lang, sorted(module.tensors)) == ("language", "sw", ["adapter"])
    assert "equals the base's own" in module.manifest.extra["imported"]["head_skipped"]
    check("static_head_seq_bn", max_diff(xlpeft.compose(base_dir("tiny-bert"), [out]), expected("adapterhub", "static_head_seq_bn")))


def test_trained_static_head_is_refused_with_the_cli_option_that_helps(tmp_path, capsys):
    """A static head that differs from the base's (train_adapter leaves its transform trainable) names --without-head."""
    from xlpeft.cli import main

    args = ["convert", str(FIXTURES / "adapterhub" / "static_head_trained"), str(tmp_path / "a"), "--from", "adapterhub",
            "--base", base_dir("tiny-bert")]
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err
    assert err.startswith("Error:") and "--without-head" in err and "unexpected" not in err, err
    assert "cls.predictions.transform.dense.weight" in err
    main([*args, "--without-head"])
    assert sorted(load_module(tmp_path / "a").tensors) == ["adapter"]


@pytest.mark.parametrize("placement, invertible, preset", [("pfeiffer", True, "seq_bn_inv"),
                                                           ("houlsby", False, "double_seq_bn")])
def test_default_configs_export_as_the_adapterhub_presets(tmp_path, placement, invertible, preset):
    """xlpeft's defaults per placement are AdapterHub's presets: the exported config is the preset's, field for field."""
    base = xlpeft.load_base(base_dir("tiny-bert"))
    config = AdapterConfig(placement=placement, reduction_factor=16, invertible=invertible)
    module = AdapterModule(config, base.hidden_size, len(base.layers))
    manifest = Manifest(kind="language", method="adapter", lang="sw", config=asdict(config),
                        base={"name": "tiny", "fingerprint": base.fingerprint, "model_type": "bert"})
    out = convert(save_module(tmp_path / "m", manifest, {"adapter": module.state_dict()}), tmp_path / "ah", "xlpeft",
                  "adapterhub")
    assert json.loads((out / "adapter_config.json").read_text())["config"] == PRESETS[preset]
