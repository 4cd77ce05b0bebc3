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


# ---- the other methods (issue 18): lora, ia3, prefix_tuning, compacter(++), par_bn, mam

METHOD_CASES = {  # fixture -> (base, xlpeft method, xlpeft config fields it maps onto)
    "lora": ("tiny-bert", "lora", dict(r=8, alpha=8.0, target_modules="query,value", layers=None, use_dora=False)),
    "lora_targets": ("tiny-bert", "lora", dict(r=4, alpha=8.0, target_modules="query,key,value,intermediate,ffn_output")),
    "lora_leave_out": ("tiny-bert", "lora", dict(r=4, alpha=16.0, dropout=0.1, layers="1")),
    "xlmr_lora": ("tiny-xlmr", "lora", dict(r=8, alpha=16.0)),
    "ia3_attn": ("tiny-bert", "ia3", dict(target_modules="key,value")),
    "prefix_tuning": ("tiny-bert", "prefix", dict(prefix_length=30, layers="all", reparameterise=True, width=64,
                                                  shift_positions=False)),
    "prefix_tuning_flat": ("tiny-bert", "prefix", dict(prefix_length=30, reparameterise=False)),
    "prefix_tuning_ejected": ("tiny-bert", "prefix", dict(prefix_length=30, reparameterise=False)),
    "xlmr_prefix_tuning": ("tiny-xlmr", "prefix", dict(prefix_length=8, width=32)),
    "compacter": ("tiny-bert", "compacter", dict(placement="houlsby", reduction_factor=4.0, non_linearity="gelu",
                                                 phm_dim=4, phm_rank=1, shared_phm_rule=True)),
    "compacter++": ("tiny-bert", "compacter", dict(placement="pfeiffer", reduction_factor=4.0)),
    "compacter_options": ("tiny-bert", "compacter", dict(placement="pfeiffer", phm_rank=2, shared_phm_rule=False)),
    "par_bn": ("tiny-bert", "parallel", dict(placement="ffn", reduction_factor=2.0, non_linearity="relu", scaling=4.0)),
    "par_bn_options": ("tiny-bert", "parallel", dict(placement="both", reduction_factor=4.0, non_linearity="gelu",
                                                     scaling=2.0)),
    "mam": ("tiny-bert", "mam", dict(prefix_length=30, width=64, reduction_factor=2.0, scaling=4.0)),
    "ner_lora": ("tiny-bert", "lora", dict(r=4, alpha=8.0)),
}


@pytest.fixture(scope="module")
def converted_methods(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapterhub_methods")
    return {case: convert(FIXTURES / "adapterhub" / case, root / case, "adapterhub", base=base_dir(kind))
            for case, (kind, _, _) in METHOD_CASES.items()}


@torch.no_grad()
def _unpadded_diff(model, exp) -> float:
    """The padded row alone, cut to its real tokens (a batch of 1, no padding), against AdapterHub's logits for it."""
    real = exp["row1_unpadded_logits"].shape[1]
    ids = exp["input_ids"][1:2, :real]
    out = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return float((out - exp["row1_unpadded_logits"]).abs().max())


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_method_logits_match_adapterhub(converted_methods, case):
    """Measured (2026-12-02): prefix, par_bn, mam, (IA)³ 0; LoRA 1.7e-6..2.7e-6 (merged into the weights), Compacter ~2e-6."""
    kind, method, _ = METHOD_CASES[case]
    exp = expected("adapterhub", case)
    model = xlpeft.compose(base_dir(kind), [converted_methods[case]])
    check(case, max_diff(model, exp))  # both rows: one padded after 8 tokens, so prefix masks must keep padding out
    if "row1_unpadded_logits" in exp:
        check(f"{case} unpadded", _unpadded_diff(model, exp))


@pytest.mark.parametrize("lang", ["prefix_tuning", "par_bn"])
def test_lora_task_over_method_language_modules_matches_adapterhub_stack(converted_methods, lang):
    """AdapterHub's Stack(lang, ner) with a LoRA task adapter over a prefix / parallel language adapter."""
    model = xlpeft.compose(base_dir("tiny-bert"), [converted_methods[lang], converted_methods["ner_lora"]])
    check(lang, max_diff(model, expected("adapterhub", "ner_lora"), f"stack_{lang}_logits"))


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_method_manifest_records_the_mapping(converted_methods, case):
    kind, method, config = METHOD_CASES[case]
    m = load_module(converted_methods[case]).manifest
    assert m.method == method
    assert {k: m.config[k] for k in config} == config
    assert m.extra["imported"]["format"] == "adapterhub"
    if case == "ner_lora":
        assert (m.kind, m.task, m.extra["head"]) == ("task", "ner", "token_classification")
    else:
        assert (m.kind, m.lang) == ("language", "sw")


def test_prefix_import_is_adapterhub_eject(converted_methods):
    """Running the prefix MLP once at import gives the prefixes AdapterHub's own eject_prefix_tuning saved."""
    mine, ejected = (load_module(converted_methods[c]).tensors["prefix"] for c in ("prefix_tuning", "prefix_tuning_ejected"))
    assert max(float((mine[k] - ejected[k]).abs().max()) for k in ("key", "value")) < 1e-6
    assert float(mine["key"].std()) > 0.1 and not torch.allclose(mine["key"], mine["value"])


def _state(directory):
    return _foreign(directory, "adapter.safetensors", "pytorch_adapter.bin")


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_method_export_matches_the_adapterhub_files(converted_methods, tmp_path, case):
    """xlpeft -> AdapterHub writes the config and tensors `save_adapter` wrote; a prefix MLP as AdapterHub ejects it."""
    src, out = FIXTURES / "adapterhub" / case, convert(converted_methods[case], tmp_path / case, "xlpeft", "adapterhub")
    ours, theirs = (json.loads((d / "adapter_config.json").read_text()) for d in (out, src))
    assert {k: ours[k] for k in ("hidden_size", "model_class", "model_type", "name")} == \
           {k: theirs[k] for k in ("hidden_size", "model_class", "model_type", "name")}
    mine, orig = _state(out), _state(src)
    if case in ("prefix_tuning", "xlmr_prefix_tuning", "mam"):  # written flat: compare with the MLP run by hand
        config = theirs["config"]["configs"][0] if case == "mam" else theirs["config"]
        assert (ours["config"]["configs"][0] if case == "mam" else ours["config"]) == config | {"flat": True}
        flat = {k: v for k, v in mine.items() if "prefix_tunings" in k}
        assert len(flat) == 3 and all(k.endswith("self_prefix.control_trans") for k in flat)
        assert _ejected_by_hand(orig, config).allclose(next(iter(flat.values())), atol=1e-6)
        assert {k: v for k, v in mine.items() if "prefix_tunings" not in k}.keys() == \
               {k for k in orig if "prefix_tunings" not in k}
        return
    if case == "ia3_attn":  # alpha is folded into the vectors at import and written as 1
        orig = {k: v * theirs["config"]["alpha"] for k, v in orig.items()}
        theirs["config"]["alpha"] = 1
    expected_config = theirs["config"] | ({"flat": True} if case == "prefix_tuning_ejected" else {})
    assert ours["config"] == expected_config
    assert mine.keys() == orig.keys()
    assert all(torch.equal(mine[k], orig[k]) for k in orig), case


def _ejected_by_hand(weights, config) -> torch.Tensor:
    """AdapterHub's PrefixTuning.eject written out: control_trans(wte(arange(P))), flattened."""
    part = {k.split("self_prefix.")[1]: v for k, v in weights.items() if k.split(".", 1)[1].startswith("prefix_tuning.")}
    hidden = torch.tanh(part["wte.weight"] @ part["control_trans.0.weight"].T + part["control_trans.0.bias"])
    assert config["non_linearity"] == "tanh"
    return (hidden @ part["control_trans.2.weight"].T + part["control_trans.2.bias"]).reshape(-1)


def _native(method: str, config, base) -> dict[str, dict[str, torch.Tensor]]:
    """A freshly built xlpeft module of ``method`` with every tensor redrawn (non-trivial, so a mix-up shows)."""
    from xlpeft.methods.compacter import CompacterModule
    from xlpeft.methods.ia3 import IA3Module, ia3_targets
    from xlpeft.methods.lora import LoraModule, resolve_targets
    from xlpeft.methods.mam import MAMModule
    from xlpeft.methods.parallel import ParallelModule
    from xlpeft.methods.prefix import PrefixEncoder

    hidden, layers = base.hidden_size, len(base.layers)
    if method == "lora":
        paths = resolve_targets(base, config)
        tensors = {"lora": LoraModule(config, {i: {s: lin for s, (_, lin) in d.items()} for i, d in paths.items()}).state_dict()}
    elif method == "ia3":
        tensors = {"ia3": IA3Module(config, ia3_targets(base, config)).state_dict()}
    elif method == "prefix":
        tensors = {"prefix": PrefixEncoder(config, hidden, layers).export()}
    elif method == "compacter":
        tensors = {"compacter": CompacterModule(config, hidden, layers).state_dict()}
    elif method == "parallel":
        tensors = {"parallel": ParallelModule(config, hidden, layers).state_dict()}
    else:
        tensors = MAMModule(config, hidden, layers).export()
    gen = torch.Generator().manual_seed(5)
    return {stem: {k: torch.randn(v.shape, generator=gen) for k, v in state.items()} for stem, state in tensors.items()}


def _native_cases():
    from xlpeft.methods.compacter import CompacterConfig
    from xlpeft.methods.ia3 import IA3Config
    from xlpeft.methods.lora import LoraConfig
    from xlpeft.methods.mam import MAMConfig
    from xlpeft.methods.parallel import ParallelConfig
    from xlpeft.methods.prefix import PrefixConfig

    return {
        "lora": ("lora", LoraConfig(r=2, alpha=3.0, target_modules="key,intermediate,ffn_output", layers="1")),
        "ia3": ("ia3", IA3Config(target_modules="value")),
        "prefix": ("prefix", PrefixConfig(prefix_length=3, width=7)),
        "compacter": ("compacter", CompacterConfig(placement="houlsby", reduction_factor=4, phm_rank=2,
                                                   factorized_phm=False)),
        "compacter++": ("compacter", CompacterConfig(placement="pfeiffer", reduction_factor=4, shared_phm_rule=False)),
        "parallel": ("parallel", ParallelConfig(placement="attn", reduction_factor=8, non_linearity="tanh", scaling=0.5)),
        "mam": ("mam", MAMConfig(prefix_length=2, width=5, reduction_factor=4, scaling=3.0)),
    }


@pytest.mark.parametrize("case", ["lora", "ia3", "prefix", "compacter", "compacter++", "parallel", "mam"])
def test_method_round_trip_from_xlpeft(tmp_path, case):
    """A module built by xlpeft -> AdapterHub -> xlpeft: the same config and identical tensors (a task one keeps its head)."""
    base = xlpeft.load_base(base_dir("tiny-bert"))
    method, config = _native_cases()[case]
    tensors = _native(method, config, base)
    task = case == "lora"
    if task:
        tensors["head"] = {"classifier.weight": torch.randn(3, 32), "classifier.bias": torch.randn(3)}
    manifest = Manifest(kind="task" if task else "language", method=method, lang=None if task else "sw",
                        task="pos" if task else None, config=asdict(config),
                        base={"name": base_dir("tiny-bert"), "fingerprint": base.fingerprint, "model_type": "bert"},
                        extra={"labels": ["a", "b", "c"], "head": "token_classification", "head_dropout": 0.1} if task else {})
    original = save_module(tmp_path / "orig", manifest, tensors)
    foreign = convert(original, tmp_path / "ah", "xlpeft", "adapterhub")
    back = load_module(convert(foreign, tmp_path / "back", "adapterhub", base=base))
    want = load_module(original).manifest.config
    assert back.manifest.method == method
    # training-only fields AdapterHub's files cannot carry: AdapterDrop, and whether the (dropped) prefix MLP trained it
    training_only = ("adapter_drop", "reparameterise")
    assert {k: v for k, v in back.manifest.config.items() if k not in training_only} == \
           {k: v for k, v in want.items() if k not in training_only}
    assert back.tensors.keys() == tensors.keys()
    for stem, state in tensors.items():
        assert back.tensors[stem].keys() == state.keys()
        assert all(torch.equal(back.tensors[stem][k], state[k]) for k in state), (stem, case)


def _with_method_config(tmp_path, case, edit):
    target = tmp_path / case
    shutil.copytree(FIXTURES / "adapterhub" / case, target)
    meta = json.loads((target / "adapter_config.json").read_text())
    meta["config"] = edit(meta["config"])
    (target / "adapter_config.json").write_text(json.dumps(meta))
    return target


@pytest.mark.parametrize(
    "case, edit, needles",
    [
        ("lora_dora", lambda c: c, ["use_dora=True", "without alpha/r"]),
        ("ia3", lambda c: c, ["intermediate_lora=True", "pre-activation"]),
        ("ia3_attn", lambda c: c | {"output_lora": True}, ["output_lora=True"]),
        ("ia3_attn", lambda c: c | {"attn_matrices": ["q", "k"]}, ["'q'"]),
        ("lora", lambda c: c | {"use_gating": True}, ["use_gating=True"]),
        ("lora", lambda c: c | {"vera_d": 0.1}, ["'lora'", "VeRA"]),
        ("lora", lambda c: c | {"dtype": "bfloat16"}, ["dtype='bfloat16'"]),
        ("lora", lambda c: c | {"r": 4}, ["layer 0 query lora_A has shape (8, 32)", "(4, 32)"]),
        ("prefix_tuning", lambda c: c | {"leave_out": [0]}, ["leave_out=[0]", "every layer"]),
        ("prefix_tuning", lambda c: c | {"non_linearity": "gelu_new"}, ["non_linearity='gelu_new'"]),
        ("prefix_tuning_flat", lambda c: c | {"prefix_length": 10}, ["flat prefix has 3840 values", "1280"]),
        ("compacter", lambda c: c | {"shared_W_phm": True}, ["shared_W_phm=True"]),
        ("compacter", lambda c: c | {"phm_dim": 3}, ["phm_dim"]),
        ("par_bn", lambda c: c | {"use_gating": True, "ln_after": True}, ["use_gating=True", "ln_after=True"]),
        ("mam", lambda c: c | {"configs": [c["configs"][0], c["configs"][1] | {"mh_adapter": True}]},
         ["'both'", "beside the FFN only"]),
    ],
)
def test_method_options_xlpeft_cannot_reproduce_are_refused_by_name(tmp_path, case, edit, needles):
    src = _with_method_config(tmp_path, case, edit)
    with pytest.raises(XlpeftError) as info:
        convert(src, tmp_path / "out", "adapterhub", base=base_dir("tiny-bert"))
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_the_refused_functions_really_differ(tmp_path):
    """Negative controls: mapping AdapterHub's DoRA or its FFN (IA)³ onto xlpeft's anyway misses its logits by far.

    (So the refusals above are needed, and these logit tests can fail.) Also a prefix with keys and
    values swapped, and a LoRA whose alpha/r is dropped, miss the recorded logits.
    """
    base = xlpeft.load_base(base_dir("tiny-bert"))
    fp = {"name": "tiny", "fingerprint": base.fingerprint, "model_type": "bert"}
    from xlpeft.interop.adapterhub.lowrank import KEY, LINEARS

    def module(case, method, config, state):
        return save_module(tmp_path / case, Manifest(kind="language", method=method, lang="sw", config=config, base=fp),
                           {method: state})

    def miss(case, directory):
        return max_diff(xlpeft.compose(base_dir("tiny-bert"), [directory]), expected("adapterhub", case))

    dora = {}
    for k, v in load_pickled(FIXTURES / "adapterhub" / "lora_dora" / "pytorch_adapter.bin").items():
        m = KEY.match(k)
        part = "magnitude" if m["part"] == "m.weight" else m["part"]
        dora[f"layers.{m['layer']}.{LINEARS[m['linear']]}.{part}"] = v.reshape(-1) if part == "magnitude" else v
    cfg = dict(r=4, alpha=8.0, dropout=0.0, target_modules="query,value", layers=None, use_dora=True, merge=True)
    assert miss("lora_dora", module("dora", "lora", cfg, dora)) > 0.05

    ia3 = {}
    for k, v in load_pickled(FIXTURES / "adapterhub" / "ia3" / "pytorch_adapter.bin").items():
        m = KEY.match(k)
        ia3[f"layers.{m['layer']}.{LINEARS[m['linear']]}"] = v.reshape(-1)
    assert miss("ia3", module("ia3", "ia3", {"target_modules": "key,value,intermediate"}, ia3)) > 0.05

    good = load_module(convert(FIXTURES / "adapterhub" / "prefix_tuning", tmp_path / "p", "adapterhub", base=base))
    swapped = {"key": good.tensors["prefix"]["value"], "value": good.tensors["prefix"]["key"]}
    assert miss("prefix_tuning", module("swapped", "prefix", good.manifest.config, swapped)) > 0.05

    lora = load_module(convert(FIXTURES / "adapterhub" / "lora_targets", tmp_path / "l", "adapterhub", base=base))
    unscaled = lora.manifest.config | {"alpha": float(lora.manifest.config["r"])}  # alpha/r = 1 instead of 2
    assert miss("lora_targets", module("unscaled", "lora", unscaled, lora.tensors["lora"])) > 0.05


@pytest.mark.parametrize(
    "method, config, needle",
    [
        ("ia3", {"target_modules": "key,value,intermediate"}, "intermediate_lora scales W1·x"),
        ("lora", {"target_modules": "query,attn_output"}, "attn_output"),
        ("lora", {"use_dora": True}, "use_dora=True"),
        ("prefix", {"layers": "input", "prefix_length": 4}, "prompt-tuning"),
        ("prefix", {"prefix_length": 4, "shift_positions": True}, "shift_positions=true"),
    ],
)
def test_method_exports_adapterhub_cannot_load_as_the_same_function_are_refused(tmp_path, method, config, needle):
    from xlpeft.methods.ia3 import IA3Config
    from xlpeft.methods.lora import LoraConfig
    from xlpeft.methods.prefix import PrefixConfig

    base = xlpeft.load_base(base_dir("tiny-bert"))
    cfg = {"ia3": IA3Config, "lora": LoraConfig, "prefix": PrefixConfig}[method](**config)
    manifest = Manifest(kind="language", method=method, lang="sw", config=asdict(cfg),
                        base={"name": "tiny", "fingerprint": base.fingerprint, "model_type": "bert"})
    src = save_module(tmp_path / "m", manifest, _native(method, cfg, base))
    with pytest.raises(XlpeftError, match=needle):
        convert(src, tmp_path / "ah", "xlpeft", "adapterhub")
    assert not (tmp_path / "ah").exists()


def test_cli_converts_a_lora_and_refuses_adapterhub_ia3_in_one_line(tmp_path, capsys):
    from xlpeft.cli import main

    main(["convert", str(FIXTURES / "adapterhub" / "lora"), str(tmp_path / "l"), "--from", "adapterhub",
          "--base", base_dir("tiny-bert")])
    assert load_module(tmp_path / "l").manifest.method == "lora"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["convert", str(FIXTURES / "adapterhub" / "ia3"), str(tmp_path / "i"), "--from", "adapterhub",
              "--base", base_dir("tiny-bert")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error:") and "\n" not in err and "intermediate_lora=True" in err, err
