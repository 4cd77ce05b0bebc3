"""Composition with sparse deltas: θ0 + δ_lang + δ_task, hybrids with adapters, overlap, merged checkpoints."""

import json

import pytest
import torch

from tests.conftest import SW_WORDS, make_lines, make_ner, use_store, write_conll
from xlpeft import compose, load_module, tracking
from xlpeft.composed import save_composed
from xlpeft.methods.sft import SparseDelta, delta_overlap
from xlpeft.models import load_base
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.recipes.train_task import TaskRequest, train_task

SFT = {"num_params": "2000", "max_seq_len": "32", "lr": "1e-2"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, base_dirs):
    """sw language modules (sft and adapter) and NER task modules (sft over the sft language module, and adapter)."""
    root = tmp_path_factory.mktemp("deltas")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        base = str(base_dirs["tiny-bert"])
        corpus = root / "sw.txt"
        corpus.write_text("\n".join(make_lines(SW_WORDS, 150)), encoding="utf-8")
        train_language(LangRequest(lang="sw", method="sft", base=base, corpus=(str(corpus),),
                                   sets={**SFT, "max_steps": "6"}))
        train_language(LangRequest(lang="sw", method="adapter", base=base, corpus=(str(corpus),),
                                   sets={"max_steps": "4", "max_seq_len": "32", "lr": "1e-2"}))
        write_conll(root / "train.conll", make_ner(100, seed=1))
        for method in ("sft", "adapter"):
            train_task(TaskRequest(task="ner", lang="sw", method=method, base=base,
                                   train_data=str(root / "train.conll"),
                                   sets={"max_steps": "10", "batch_size": "16", "lang_module": str(root / "modules/lang-sw-sft"), "max_seq_len": "48",
                                         "lr": "3e-3", **({"num_params": "3000"} if method == "sft" else {})}))
        yield {"root": root, "base": base}


@pytest.fixture
def env(store, monkeypatch):
    use_store(monkeypatch, store["root"])
    return store


def _ids(base):
    ids = torch.randint(5, len(base.tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_task_delta_records_its_language_delta(env):
    task = load_module("modules/task-ner-sft")
    assert task.manifest.method == "sft" and task.manifest.extra["lang_module"]["method"] == "sft"
    assert task.manifest.trainable_parameters == 3000 + sum(t.numel() for t in task.tensors["head"].values())
    assert sum(t.numel() for k, t in task.tensors["delta"].items() if k.endswith(".indices")) == 3000


def test_delta_sum_equals_manual_weight_sum(env):
    base = load_base(env["base"])
    lang, task = load_module("modules/lang-sw-sft"), load_module("modules/task-ner-sft")
    model = compose(base, [lang, task])
    assert model.xlpeft_composition.describe() == "sum(language:sw/sft, task:ner/sft)"
    assert len(model.xlpeft_modules) == 0
    manual = {k: v.clone() for k, v in base.encoder.state_dict().items()}
    prefix = base.arch.encoder + "."
    for module in (lang, task):
        for name, (idx, vals) in SparseDelta.from_tensors(module.tensors["delta"]).entries.items():
            key = name.removeprefix(prefix)
            manual[key].view(-1).index_add_(0, idx, vals)
    composed = model.get_submodule(base.arch.encoder).state_dict()
    for key, value in manual.items():
        torch.testing.assert_close(composed[key], value, rtol=0, atol=1e-6)
    # the base itself is untouched by composing
    fresh = load_base(env["base"])
    for key, value in fresh.encoder.state_dict().items():
        assert torch.equal(base.encoder.state_dict()[key], value)


def test_overlap_is_reported_per_layer(env):
    lang, task = load_module("modules/lang-sw-sft"), load_module("modules/task-ner-sft")
    overlap = delta_overlap(lang, task)
    direct = SparseDelta.from_tensors(lang.tensors["delta"]).overlap(SparseDelta.from_tensors(task.tensors["delta"]))
    assert sum(overlap.values()) == sum(direct.values())
    assert all(k.startswith(("layer_", "embeddings", "other")) for k in overlap)


@pytest.mark.parametrize("lang_dir, task_dir, describe", [
    ("modules/lang-sw-sft", "modules/task-ner-adapter", "stack(language:sw/sft, task:ner/adapter)"),
    ("modules/lang-sw-adapter", "modules/task-ner-sft", "stack(language:sw/adapter, task:ner/sft)"),
])
def test_hybrids_equal_their_parts(env, lang_dir, task_dir, describe):
    """A hybrid equals: delta merged into the weights by hand, adapter hooked by hand, same head."""
    from xlpeft.compose import activate
    from xlpeft.methods.heads import build_head
    from xlpeft.training import task_logits

    base = load_base(env["base"])
    lang, task = load_module(lang_dir), load_module(task_dir)
    model = compose(base, [lang, task])
    assert model.xlpeft_composition.describe() == describe
    batch = _ids(base)
    with torch.no_grad():
        got = model(**batch).logits
    active = activate(base, [lang, task])
    head = build_head("token_classification", base.hidden_size, 7).eval()
    head.load_state_dict(task.tensors["head"])
    base.model.eval()
    with torch.no_grad():
        expected = task_logits(base, head, batch)
    active.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_delta_only_output_is_a_plain_transformers_checkpoint(env, tmp_path):
    from transformers import AutoModelForTokenClassification

    base = load_base(env["base"])
    model = compose(base, ["modules/lang-sw-sft", "modules/task-ner-sft"])
    out = save_composed(model, tmp_path / "merged", base.tokenizer)
    plain = AutoModelForTokenClassification.from_pretrained(out).eval()
    batch = _ids(base)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
    assert json.loads((out / "xlpeft_composition.json").read_text())["unmerged"] == {}
    assert plain.config.id2label[1] == "B-PER"


def test_compose_cli_reports_overlap(env, capsys, tmp_path):
    from xlpeft.cli import main

    write_conll(tmp_path / "sw.conll", make_ner(10, seed=3))
    main(["compose", "--lang", "sw", "--task", "ner", "--base", env["base"], "--lang-method", "sft",
          "--task-method", "sft", "--eval-data", str(tmp_path / "sw.conll")])
    out = capsys.readouterr().out
    assert "delta overlap (shared indices): total" in out
    run = tracking.client().get_run(out.strip().split()[-1])
    assert run.data.tags["xlpeft.method"] == "sft+sft" and "overlap_total" in run.data.metrics


def test_language_delta_with_mlm_head_entries_composes_under_a_task(env, tmp_path):
    """Deltas that also change the MLM head (composable-sft releases do) still sit under a task module."""
    from xlpeft.io import save_module

    base = load_base(env["base"])
    lang = load_module("modules/lang-sw-sft")
    head_bias = f"{base.arch.mlm_head}.predictions.bias"
    tensors = dict(lang.tensors["delta"])
    tensors[f"{head_bias}.indices"] = torch.tensor([0, 1])
    tensors[f"{head_bias}.values"] = torch.tensor([0.5, -0.5])
    path = save_module(tmp_path / "with-head", lang.manifest, {"delta": tensors})
    mlm = compose(base, [path])
    assert torch.allclose(mlm.get_submodule(head_bias.rsplit(".", 1)[0]).bias[:2],
                          base.mlm_head.predictions.bias[:2] + torch.tensor([0.5, -0.5]))
    task_model = compose(base, [path, "modules/task-ner-sft"])
    assert type(task_model).__name__ == "BertForTokenClassification"
