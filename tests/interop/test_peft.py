"""peft 0.21 LoRA / DoRA / (IA)³ <-> xlpeft: the same logits as peft's own model (≤1e-5), round trips, refusals.

peft models are built in-process on the tiny bases, given non-trivial weights (B != 0, magnitudes and
scales != their init), saved with ``save_pretrained`` and converted; nothing is hard-coded.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")

from transformers import AutoModelForMaskedLM, AutoModelForTokenClassification  # noqa: E402

from xlpeft.config import TrainConfig  # noqa: E402
from xlpeft.errors import XlpeftError  # noqa: E402
from xlpeft.interop.peft import export_peft, import_peft  # noqa: E402
from xlpeft.io import Manifest, load_module, save_module  # noqa: E402
from xlpeft.methods.ia3 import IA3Config, apply_ia3, prepare_ia3  # noqa: E402
from xlpeft.methods.lora import LoraConfig, apply_lora, prepare_lora  # noqa: E402
from xlpeft.models import load_base  # noqa: E402

ARCHS = ("tiny-bert", "tiny-xlmr")
TOL = 1e-5
IA3_TARGETS = r".*layer\.\d+\.(?:attention\.self\.(?:key|value)|output\.dense)"
IA3_FF = r".*layer\.\d+\.output\.dense"


def batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded row: the attention mask reaches every layer
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model.eval()(**inputs).logits


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial adapter weights: B != 0, DoRA magnitudes and (IA)³ scales away from their init."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "lora_A" in name or "lora_B" in name:
            p.copy_(0.3 * noise)
        elif "lora_magnitude_vector" in name or "ia3_l" in name or name.endswith(
                (".magnitude", ".key", ".value", ".intermediate")):  # peft's names, then xlpeft's
            p.copy_(p * (1 + 0.3 * noise))


def peft_dir(tmp_path, base_dir, config, head: bool = False, seed: int = 0):
    """(peft model with random adapter weights, its save_pretrained directory, the model it wraps before wrapping)."""
    torch.manual_seed(seed)
    model = (AutoModelForTokenClassification.from_pretrained(base_dir, num_labels=3) if head
             else AutoModelForMaskedLM.from_pretrained(base_dir))
    bare = copy.deepcopy(model).requires_grad_(False)
    wrapped = peft.get_peft_model(model, config)
    randomise(wrapped, seed)
    wrapped.save_pretrained(tmp_path / "peft")
    return wrapped, tmp_path / "peft", bare


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_gives_peft_logits_merged_and_unmerged(base_dirs, tmp_path, arch, dora):
    wrapped, src, _ = peft_dir(tmp_path, base_dirs[arch], peft.LoraConfig(r=4, lora_alpha=8, use_dora=dora,
                                                                           target_modules=["query", "value"]))
    base = load_base(str(base_dirs[arch]))
    inputs = batch(len(base.tokenizer))
    ref, bare = logits(wrapped, inputs), logits(base.model, inputs)
    assert (ref - bare).abs().max() > 1e-3, "the peft adapter changes the logits (100 x the tolerance)"
    module = load_module(import_peft(src, tmp_path / "xlpeft", base))
    assert module.manifest.config["use_dora"] is dora and module.manifest.config["target_modules"] == "query,value"
    for merge in (True, False):
        handle = apply_lora(base, module, merge=merge)
        got = logits(base.model, inputs)
        handle.remove()
        assert (got - ref).abs().max() <= TOL, f"merge={merge}"
    # the check can fail: with one B not copied (left at its init, 0) the logits are peft's no more
    state = dict(module.tensors["lora"])
    state["layers.1.value.lora_B"] = torch.zeros_like(state["layers.1.value.lora_B"])
    handle = apply_lora(base, dataclasses.replace(module, tensors={"lora": state}))
    assert (logits(base.model, inputs) - ref).abs().max() > 1e-3
    handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_lora_on_a_token_classifier_gives_peft_logits(base_dirs, tmp_path, arch):
    """Every Linear in the layers (``dense`` names the three sub-layer outputs' Linears), on a *ForTokenClassification model."""
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["query", "key", "value", "dense"])
    wrapped, src, bare = peft_dir(tmp_path, base_dirs[arch], config, head=True)
    base = load_base(str(base_dirs[arch]))
    module = load_module(import_peft(src, tmp_path / "xlpeft", base))
    assert module.manifest.config["target_modules"] == "query,key,value,attn_output,intermediate,ffn_output"
    inputs = batch(len(base.tokenizer))
    ref = logits(wrapped, inputs)
    task_base = dataclasses.replace(base, model=bare)
    for merge in (True, False):
        handle = apply_lora(task_base, module, merge=merge)
        got = logits(bare, inputs)
        handle.remove()
        assert got.shape == ref.shape and (got - ref).abs().max() <= TOL, f"merge={merge}"
    assert (logits(bare, inputs) - ref).abs().max() > 1e-3, "removed: the classifier's own logits again"


@pytest.mark.parametrize("arch", ARCHS)
def test_ia3_gives_peft_logits(base_dirs, tmp_path, arch):
    wrapped, src, _ = peft_dir(tmp_path, base_dirs[arch], peft.IA3Config(target_modules=IA3_TARGETS,
                                                                          feedforward_modules=IA3_FF))
    base = load_base(str(base_dirs[arch]))
    inputs = batch(len(base.tokenizer))
    ref = logits(wrapped, inputs)
    module = load_module(import_peft(src, tmp_path / "xlpeft", base))
    assert module.manifest.config == {"target_modules": "key,value,intermediate"}
    handle = apply_ia3(base, module)
    got = logits(base.model, inputs)
    handle.remove()
    assert (got - ref).abs().max() <= TOL
    ones = {k: torch.ones_like(v) if k.endswith("intermediate") else v for k, v in module.tensors["ia3"].items()}
    handle = apply_ia3(base, dataclasses.replace(module, tensors={"ia3": ones}))
    assert (logits(base.model, inputs) - ref).abs().max() > 1e-3, "the FFN scales were not copied: peft's logits no more"
    handle.remove()


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_peft_to_xlpeft_to_peft_gives_the_same_files(base_dirs, tmp_path, kind):
    config = (peft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF) if kind == "ia3"
              else peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["key", "query"],
                                   use_dora=kind == "dora"))
    _, src, _ = peft_dir(tmp_path, base_dirs["tiny-bert"], config)
    out = export_peft(import_peft(src, tmp_path / "xlpeft", str(base_dirs["tiny-bert"])), tmp_path / "back")
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((src / "adapter_config.json").read_text())
    before, after = load_file(str(src / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def own_module(base, tmp_path, method: str, cfg, seed: int = 1):
    """An xlpeft module made by xlpeft (prepared, given random weights, exported, saved): no peft config behind it."""
    trainable = (prepare_lora if method == "lora" else prepare_ia3)(base, cfg, TrainConfig())
    randomise(trainable.module, seed)
    tensors, _ = trainable.export()
    trainable.close()
    manifest = Manifest(kind="language", method=method, base={"name": str(base.path), "fingerprint": base.fingerprint,
                                                              "model_type": base.model.config.model_type},
                        config=dataclasses.asdict(cfg), lang="sw")
    return save_module(tmp_path / f"own-{method}", manifest, tensors)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method, cfg", [
    ("lora", LoraConfig(r=2, alpha=3.0, target_modules="all-linear", layers="1", use_dora=True)),
    ("lora", LoraConfig(r=3, target_modules="*_output,query")),
    ("ia3", IA3Config(target_modules="value,intermediate")),
], ids=["dora-all-linear-layer1", "lora-outputs", "ia3"])
def test_xlpeft_export_loads_in_peft_with_equal_logits(base_dirs, tmp_path, arch, method, cfg):
    base = load_base(str(base_dirs[arch]))
    module = load_module(own_module(base, tmp_path, method, cfg))
    inputs = batch(len(base.tokenizer))
    handle = (apply_lora if method == "lora" else apply_ia3)(base, module)
    mine = logits(base.model, inputs)
    handle.remove()
    assert (mine - logits(base.model, inputs)).abs().max() > 1e-3, "the module changes the logits"
    out = export_peft(module.path, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(base_dirs[arch]), str(out))
    adapted = {n.split(".lora_")[0].split(".ia3_l")[0] for n, _ in loaded.named_parameters() if "lora_" in n or "ia3_l" in n}
    expected = sum(1 for k in module.tensors[method] if method == "ia3" or k.endswith("lora_A"))
    assert len(adapted) == expected, "peft adapts exactly the Linears xlpeft did"
    assert (logits(loaded, inputs) - mine).abs().max() <= TOL


def write_peft(tmp_path, config: dict, tensors: dict[str, torch.Tensor]):
    src = tmp_path / "hand"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(src / "adapter_model.safetensors"))
    return src


@pytest.mark.parametrize("change, named", [
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["classifier"]}, "modules_to_save"),
    ({"use_rslora": True}, "use_rslora"),
    ({"rank_pattern": {"query": 4}}, "rank_pattern"),
    ({"peft_type": "LOHA"}, "LOHA"),
    ({"r": 4}, "r=4"),
])
def test_unsupported_peft_options_are_refused_by_name(base_dirs, tmp_path, change, named):
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query"
    src = write_peft(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "bias": "none", **change},
                     {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b})
    with pytest.raises(XlpeftError, match=named) as info:
        import_peft(src, tmp_path / "out", str(base_dirs["tiny-bert"]))
    assert "\n" not in str(info.value)


def test_hub_key_forms_are_accepted_and_stray_keys_refused(base_dirs, tmp_path):
    """Keys without ``base_model.model.`` and with ``.default`` (state-dict form) import; an unplaceable key is named."""
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    keys = {"bert.encoder.layer.1.attention.self.value.lora_A.default.weight": a,
            "bert.encoder.layer.1.attention.self.value.lora_B.default.weight": b}
    src = write_peft(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "bias": "none"}, keys)
    module = load_module(import_peft(src, tmp_path / "out", str(base_dirs["tiny-bert"])))
    assert module.manifest.config["target_modules"] == "value" and module.manifest.config["layers"] == "1"
    assert torch.equal(module.tensors["lora"]["layers.1.value.lora_B"], b)
    (tmp_path / "hand" / "adapter_model.safetensors").unlink()
    save_file({**keys, "bert.pooler.dense.lora_A.weight": a.clone()}, str(tmp_path / "hand" / "adapter_model.safetensors"))
    with pytest.raises(XlpeftError, match="bert.pooler.dense"):
        import_peft(src, tmp_path / "out2", str(base_dirs["tiny-bert"]))


def test_peft_default_ia3_targets_for_bert_are_refused(base_dirs, tmp_path):
    """peft's default (IA)³ for BERT also scales attention.output.dense's input, which Liu et al. 2022 do not."""
    _, src, _ = peft_dir(tmp_path, base_dirs["tiny-bert"], peft.IA3Config())
    with pytest.raises(XlpeftError, match="attention.output.dense"):
        import_peft(src, tmp_path / "out", str(base_dirs["tiny-bert"]))


def test_cli_convert_both_ways(base_dirs, tmp_path):
    from xlpeft.cli import cli

    _, src, _ = peft_dir(tmp_path, base_dirs["tiny-xlmr"], peft.LoraConfig(r=2, lora_alpha=2, target_modules=["value"]))
    runner = CliRunner()
    got = runner.invoke(cli, ["convert", str(src), str(tmp_path / "x"), "--from", "peft", "--base",
                              str(base_dirs["tiny-xlmr"])])
    assert got.exit_code == 0, got.output
    assert load_module(tmp_path / "x").manifest.method == "lora"
    back = runner.invoke(cli, ["convert", str(tmp_path / "x"), str(tmp_path / "p"), "--from", "xlpeft", "--to", "peft"])
    assert back.exit_code == 0, back.output
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()
