"""Merging deltas (xlpeft merge): the arithmetic against hand-computed values, LoRA rank concatenation,
mixed sft + LoRA merges, task heads, lineage in MLflow, and the errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.methods.test_lora import make_module as make_lora
from tests.test_cli import assert_one_error_line, run_cli
from xlpeft import load_module, tracking
from xlpeft.cli import main
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.io import Manifest, save_module
from xlpeft.merging import MergeConfig, merge_entries, merge_modules
from xlpeft.methods.lora import LoraConfig, apply_lora
from xlpeft.methods.sft import SFTConfig, SparseDelta, apply_sft
from xlpeft.models import load_base

QUERY0 = "bert.encoder.layer.0.attention.self.query.weight"
VALUE1 = "bert.encoder.layer.1.attention.self.value.weight"


@pytest.fixture
def bert(base_dirs):
    return load_base(str(base_dirs["tiny-bert"]))


def make_sft(base, path, entries: dict[str, tuple[list[int], list[float]]], lang="sw", kind="language", head=None):
    delta = SparseDelta({k: (torch.tensor(i, dtype=torch.long), torch.tensor(v)) for k, (i, v) in entries.items()})
    tensors = {"delta": delta.to_tensors()}
    extra = {}
    if kind == "task":
        tensors["head"] = head
        extra = {"labels": ["O", "B-PER"], "head": "token_classification", "head_dropout": 0.1}
    manifest = Manifest(kind=kind, method="sft", config=dataclasses.asdict(SFTConfig(num_params=delta.num_params)),
                        lang=lang, task="ner" if kind == "task" else None, extra=extra,
                        base={"name": base.name, "fingerprint": base.fingerprint, "model_type": "bert"})
    return load_module(save_module(path, manifest, tensors))


def applied_weights(base, module) -> dict[str, torch.Tensor]:
    """The base's weights with ``module`` applied (then removed again)."""
    handle = (apply_sft if module.manifest.method == "sft" else apply_lora)(base, module)
    out = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    handle.remove()
    return out


def as_dense(entries, sizes) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(sizes[n]).index_add_(0, idx, vals.float()) for n, (idx, vals) in entries.items()}


# ---- the arithmetic

def test_linear_and_task_arithmetic_are_weighted_sums_on_the_union():
    one = {"w": (torch.tensor([0, 3]), torch.tensor([1.0, 2.0]))}
    two = {"w": (torch.tensor([3, 5]), torch.tensor([4.0, -1.0])), "b": (torch.tensor([1]), torch.tensor([6.0]))}
    avg = merge_entries([one, two], MergeConfig(), {"w": 8, "b": 2})
    assert avg["w"][0].tolist() == [0, 3, 5] and avg["w"][1].tolist() == [0.5, 3.0, -0.5]
    assert avg["b"][1].tolist() == [3.0]
    ta = merge_entries([one, two], MergeConfig(method="task_arithmetic", weights=(1.0, 0.5), scale=2.0), {"w": 8, "b": 2})
    assert ta["w"][1].tolist() == [2.0, 2 * (2.0 + 2.0), 2 * -0.5] and ta["b"][1].tolist() == [6.0]


def test_ties_trims_elects_the_sign_and_averages_only_agreeing_values():
    """Three deltas on one 10-entry weight, density 0.3 (3 entries each), hand-computed."""
    d1 = {"w": (torch.arange(5), torch.tensor([5.0, -4.0, 3.0, 0.1, 0.2]))}   # trimmed: 5, -4, 3 at 0, 1, 2
    d2 = {"w": (torch.arange(5), torch.tensor([-1.0, 2.0, 0.05, 6.0, 0.0]))}  # trimmed: -1, 2, 6 at 0, 1, 3
    d3 = {"w": (torch.arange(5), torch.tensor([-2.0, -3.0, -0.5, 0.0, 9.0]))}  # trimmed: -2, -3, 9 at 0, 1, 4
    out = merge_entries([d1, d2, d3], MergeConfig(method="ties", density=0.3), {"w": 10})
    # entry 0: 5 - 1 - 2 = 2 > 0 -> only 5 agrees; entry 1: -4 + 2 - 3 < 0 -> mean(-4, -3); entry 2: only 3; 3: 6; 4: 9
    assert out["w"][0].tolist() == [0, 1, 2, 3, 4]
    assert out["w"][1].tolist() == [5.0, -3.5, 3.0, 6.0, 9.0]
    assert merge_entries([d1, d2, d3], MergeConfig(method="ties", density=0.3), {"w": 10})["w"][1].tolist() == \
        out["w"][1].tolist(), "deterministic"


def test_ties_of_a_delta_with_itself_is_the_delta_trimmed_to_the_density():
    gen = torch.Generator().manual_seed(0)
    d = {"w": (torch.arange(0, 40, 2), torch.randn(20, generator=gen))}
    whole = merge_entries([d, d], MergeConfig(method="ties", density=1.0), {"w": 40})
    assert torch.equal(whole["w"][0], d["w"][0]) and torch.equal(whole["w"][1], d["w"][1])
    trimmed = merge_entries([d, d], MergeConfig(method="ties", density=0.1), {"w": 40})  # 4 of the 40 entries
    top = d["w"][1].abs().topk(4).indices.sort().values
    assert torch.equal(trimmed["w"][0], d["w"][0][top]) and torch.equal(trimmed["w"][1], d["w"][1][top])


@pytest.mark.parametrize("kwargs, named", [
    ({"method": "mean"}, "`method` should be one of"),
    ({"density": 0.0}, "`density` should be > 0.0"),
    ({"density": 1.5}, "`density` should be <= 1.0"),
    ({"scale": float("nan")}, "`scale` should be a finite number"),
    ({"weights": (1.0, float("inf"))}, "`weights` should be finite numbers"),
])
def test_bad_merge_settings_are_one_line_errors(kwargs, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace("[", r"\[")):
        MergeConfig(**kwargs)


# ---- modules

def test_loras_of_the_same_targets_merge_into_one_lora_of_the_summed_rank(bert, tmp_path):
    one = make_lora(bert, tmp_path, LoraConfig(r=2, alpha=2.0, target_modules="query,value"), seed=1, name="one")
    two = make_lora(bert, tmp_path, LoraConfig(r=4, alpha=8.0, target_modules="query,value"), seed=2, name="two")
    manifest, tensors = merge_modules([one, two], bert, MergeConfig(method="task_arithmetic", weights=(0.7, 0.3),
                                                                    scale=0.5), "sw")
    assert manifest.method == "lora" and manifest.config["r"] == 6
    merged = load_module(save_module(tmp_path / "merged", manifest, tensors))
    w0 = {n: p.detach().clone() for n, p in bert.model.named_parameters()}
    w1, w2, wm = (applied_weights(bert, m) for m in (one, two, merged))
    for name in (QUERY0, VALUE1):
        expected = w0[name] + 0.5 * (0.7 * (w1[name] - w0[name]) + 0.3 * (w2[name] - w0[name]))
        torch.testing.assert_close(wm[name], expected, rtol=0, atol=1e-6)
    assert manifest.extra["merged_from"][1]["weight"] == 0.3
    other = make_lora(bert, tmp_path, LoraConfig(r=2, target_modules="query"), seed=4, name="other")
    mixed, _ = merge_modules([one, other], bert, MergeConfig(), "sw")
    assert mixed.method == "sft", "LoRAs of different weights merge as a sparse delta, not one LoRA"


def test_an_sft_delta_and_a_lora_merge_into_an_sft_delta_that_is_their_weighted_sum(bert, tmp_path):
    sft = make_sft(bert, tmp_path / "sft", {QUERY0: ([0, 7, 40], [0.5, -0.25, 1.0])})
    lora = make_lora(bert, tmp_path, LoraConfig(r=2, target_modules="query"), seed=3, name="lora")
    manifest, tensors = merge_modules([sft, lora], bert, MergeConfig(), "sw")
    assert manifest.method == "sft"
    merged = load_module(save_module(tmp_path / "merged", manifest, tensors))
    w0 = {n: p.detach().clone() for n, p in bert.model.named_parameters()}
    ws, wl, wm = (applied_weights(bert, m) for m in (sft, lora, merged))
    expected = w0[QUERY0] + 0.5 * (ws[QUERY0] - w0[QUERY0]) + 0.5 * (wl[QUERY0] - w0[QUERY0])
    torch.testing.assert_close(wm[QUERY0], expected, rtol=0, atol=1e-6)
    assert all(torch.equal(wm[n], w0[n]) for n in w0 if ".query." not in n), "only the LoRA's and sft's weights change"


def test_task_modules_merge_their_heads_with_the_normalised_weights(bert, tmp_path):
    heads = [{"weight": torch.full((2, bert.hidden_size), float(v)), "bias": torch.tensor([v, -v])} for v in (1.0, 4.0)]
    a = make_sft(bert, tmp_path / "a", {QUERY0: ([1], [1.0])}, lang="en", kind="task", head=heads[0])
    b = make_sft(bert, tmp_path / "b", {QUERY0: ([2], [2.0])}, lang="tr", kind="task", head=heads[1])
    manifest, tensors = merge_modules([a, b], bert, MergeConfig(method="task_arithmetic", weights=(3.0, 1.0)), "ner")
    assert manifest.kind == "task" and manifest.task == "ner" and manifest.lang == "en+tr"
    assert tensors["head"]["bias"].tolist() == [0.75 * 1 + 0.25 * 4, -(0.75 * 1 + 0.25 * 4)]
    assert tensors["delta"][f"{QUERY0}.values"].tolist() == [3.0, 2.0]
    assert manifest.trainable_parameters == 2 + sum(t.numel() for t in tensors["head"].values())


def test_modules_that_are_not_weight_deltas_or_do_not_match_are_refused(bert, tmp_path):
    sft = make_sft(bert, tmp_path / "sft", {QUERY0: ([0], [1.0])})
    dora = make_lora(bert, tmp_path, LoraConfig(r=2, use_dora=True, target_modules="query"), name="dora")
    with pytest.raises(XlpeftError, match="DoRA module"):
        merge_modules([sft, dora], bert, MergeConfig(), "sw")
    with pytest.raises(XlpeftError, match="at least two modules"):
        merge_modules([sft], bert, MergeConfig(), "sw")
    with pytest.raises(ConfigError, match="gives 3 weight"):
        merge_modules([sft, sft], bert, MergeConfig(weights=(1.0, 2.0, 3.0)), "sw")
    head = {"weight": torch.zeros(2, bert.hidden_size), "bias": torch.zeros(2)}
    task = make_sft(bert, tmp_path / "task", {QUERY0: ([0], [1.0])}, kind="task", head=head)
    with pytest.raises(XlpeftError, match="is a task module but .* is a language module"):
        merge_modules([sft, task], bert, MergeConfig(), "sw")


# ---- the command: saved, logged, registered with lineage

def test_merge_command_registers_the_merged_module_with_lineage(bert, base_dirs, workdir, capsys):
    base = str(base_dirs["tiny-bert"])
    bert = load_base(base)
    make_sft(bert, workdir / "sw", {QUERY0: ([0, 1, 2], [1.0, -2.0, 3.0])})
    make_sft(bert, workdir / "tr", {QUERY0: ([2, 3], [-1.0, 4.0]), VALUE1: ([9], [0.5])}, lang="tr")
    main(["merge", "sw", "tr", "--method", "ties", "--density", "1", "--output", "merged"])
    out = capsys.readouterr().out
    assert "registered as xlpeft-lang-sw+tr-sft version 1" in out
    merged = load_module("merged")
    assert merged.manifest.lang == "sw+tr" and [p["lang"] for p in merged.manifest.extra["merged_from"]] == ["sw", "tr"]
    assert merged.tensors["delta"][f"{QUERY0}.values"].tolist() == [1.0, -2.0, 3.0, 4.0]  # entry 2: 3 vs -1 -> 3
    path, version = tracking.find_reference("xlpeft-lang-sw+tr-sft", bert.fingerprint)
    run = tracking.client().get_run(version.run_id)
    assert run.data.tags["xlpeft.parent.0"] == "sw" and run.data.tags["xlpeft.parent.1"] == "tr"
    assert run.data.tags["xlpeft.merge_method"] == "ties" and run.data.params["merge.density"] == "1.0"
    # a registered name as a source: the merged module merged again with sw, by name
    main(["merge", "xlpeft-lang-sw+tr-sft@1", "sw", "--name", "sw", "--output", "again"])
    out = capsys.readouterr().out
    assert "registered as xlpeft-lang-sw-sft version 1" in out


@pytest.mark.parametrize("args, needles", [
    (["merge", "sw", "--output", "m"], ["at least two modules"]),
    (["merge", "sw", "nowhere", "--output", "m"], ["'nowhere'", "neither a directory nor a registered name"]),
    (["merge", "sw", "sw", "--weights", "1,x", "--output", "m"], ["expected comma-separated numbers"]),
    (["merge", "sw", "sw", "--density", "2", "--method", "ties", "--output", "m"], ["`density` should be <= 1.0"]),
])
def test_merge_command_errors_are_one_line(base_dirs, workdir, capsys, args, needles):
    make_sft(load_base(str(base_dirs["tiny-bert"])), workdir / "sw", {QUERY0: ([0], [1.0])})
    code, _, err = run_cli(capsys, *args)
    assert_one_error_line(code, err, *needles)
    assert not (workdir / "m").exists()
