"""train-lang --method sft end to end on tiny bases: base untouched, K in the artifact, MLflow run + registry."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SW_WORDS, make_lines, use_store
from xlpeft import load_module, tracking
from xlpeft.cli import main
from xlpeft.methods.sft import SparseDelta
from xlpeft.models import load_base
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.registry import get_method
from xlpeft.tracking.flavor import MODEL_FILES

MODEL_ARTIFACTS = [f"module/{name}" for name in MODEL_FILES]  # a module folder is an MLflow Model

SETS = {"max_seq_len": "32", "lr": "1e-2", "log_every": "5", "num_params": "800"}


@pytest.fixture(scope="module", params=["tiny-bert", "tiny-xlmr"])
def trained_once(request, tmp_path_factory, base_dirs):
    """One training run per base, shared by the tests below that only read what it produced."""
    root = tmp_path_factory.mktemp(f"sft-{request.param}")
    corpus = root / "sw.txt"
    corpus.write_text("\n".join(make_lines(SW_WORDS, 200, seed=2)) + "\n", encoding="utf-8")
    base_dir = base_dirs[request.param]
    before = {k: v.clone() for k, v in load_file(str(base_dir / "model.safetensors")).items()}
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        req = LangRequest(lang="sw", method="sft", base=str(base_dir), corpus=(str(corpus),),
                          sets={**SETS, "max_steps": "20"})
        result = train_language(req)
    return result, base_dir, before, root


@pytest.fixture
def trained(trained_once, monkeypatch):
    result, base_dir, before, root = trained_once
    use_store(monkeypatch, root)
    return result, base_dir, before


def test_base_on_disk_untouched_and_k_respected(trained):
    result, base_dir, before = trained
    after = load_file(str(base_dir / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the base file on disk changed"
    module = load_module(result.path)
    assert module.manifest.files == ["delta.safetensors"]
    delta = SparseDelta.from_tensors(module.tensors["delta"])
    extra = module.manifest.extra
    assert delta.num_params == 800 == module.manifest.trainable_parameters == extra["num_params"]
    assert extra["per_tensor_counts"] == delta.counts() and extra["selection"] == "magnitude"
    params = dict(load_base(str(base_dir)).model.named_parameters(remove_duplicate=False))
    for name, (idx, values) in delta.entries.items():
        assert idx.dtype == torch.long and values.dtype == torch.float32 and idx.dim() == values.dim() == 1
        assert len(torch.unique(idx)) == len(idx) and int(idx.max()) < params[name].numel()
        assert "LayerNorm" not in name and not name.startswith(("cls.", "lm_head."))
    assert any(bool((v != 0).any()) for _, v in delta.entries.values()), "phase 2 should have learned something"


def test_manifest_and_mlflow_run(trained):
    result, base_dir, _ = trained
    manifest = json.loads((result.path / "xlpeft.json").read_text())
    assert manifest["method"] == "sft" and manifest["kind"] == "language"
    assert manifest["config"]["selection"] == "magnitude" and manifest["config"]["num_params"] == 800
    assert manifest["training"]["steps"] == 20
    assert {k: v["steps"] for k, v in manifest["training"]["phases"].items()} == {"full": 10, "sparse": 10}
    assert manifest["training"]["eval_loss"] < manifest["training"]["eval_loss_before"]
    client = tracking.client()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["xlpeft.method"] == "sft"
    assert run.data.params["method.selection"] == "magnitude"
    metrics = run.data.metrics
    for key in ("full_peak_memory_mb", "sparse_peak_memory_mb", "selection_peak_memory_mb", "selection_seconds",
                "full_steps_per_second", "sparse_steps_per_second"):
        assert key in metrics and metrics[key] >= 0, key
    assert metrics["full_peak_memory_mb"] > 0 and metrics["selected_params"] == 800
    assert [m.step for m in client.get_metric_history(result.run_id, "loss")] == [5, 10, 15, 20]
    assert {a.path for a in client.list_artifacts(result.run_id, "module")} == {
        "module/xlpeft.json", "module/delta.safetensors", *MODEL_ARTIFACTS}
    assert result.registered_name == "xlpeft-lang-sw-sft"
    path, version = tracking.find_reference("xlpeft-lang-sw-sft", load_base(str(base_dir)).fingerprint)
    assert version.run_id == result.run_id
    downloaded = load_module(path).tensors["delta"]
    assert all(torch.equal(downloaded[k], v) for k, v in load_module(result.path).tensors["delta"].items())


def test_activate_applies_the_delta_and_remove_reverts_it(trained):
    result, base_dir, _ = trained
    base = load_base(str(base_dir))
    ids = torch.randint(5, len(base.tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    with torch.no_grad():
        ref = base.model(input_ids=ids).logits
    handle = get_method("sft").apply(base, load_module(result.path))
    with torch.no_grad():
        out = base.model(input_ids=ids).logits
    handle.remove()
    handle.remove()  # a second remove is a no-op
    assert not torch.allclose(out, ref, atol=1e-5)
    for n, p in base.model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_random_selection_spends_every_step_on_phase2(workdir, base_dirs, sw_corpus):
    req = LangRequest(lang="sw", method="sft", base=str(base_dirs["tiny-bert"]), corpus=(str(sw_corpus),),
                      sets={"max_steps": "6", **SETS, "selection": "random", "num_params": "300"})
    manifest = load_module(train_language(req).path).manifest
    assert {k: v["steps"] for k, v in manifest.training["phases"].items()} == {"sparse": 6}
    assert manifest.trainable_parameters == 300


def test_cli_train_lang_sft(workdir, base_dirs, sw_corpus, capsys):
    main(["train-lang", "--lang", "sw", "--method", "sft", "--base", str(base_dirs["tiny-xlmr"]),
          "--corpus", str(sw_corpus), "--max-steps", "20", "--set", "max_seq_len=32", "--set", "selection=movement"])
    out = capsys.readouterr().out
    assert "registered as xlpeft-lang-sw-sft version 1" in out
    manifest = load_module(workdir / "modules" / "lang-sw-sft").manifest
    assert manifest.extra["selection"] == "movement"
    assert manifest.trainable_parameters == manifest.extra["num_params"]  # the default K, scaled to the tiny model


def test_bad_sft_key_is_one_error_line(workdir, base_dirs, sw_corpus, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-lang", "--lang", "sw", "--method", "sft", "--base", str(base_dirs["tiny-bert"]),
              "--corpus", str(sw_corpus), "--set", "selection=lottery"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("Error:") and "'lottery'" in err and "Traceback" not in err
