"""train-lang end to end on tiny bases: frozen base, trained adapters, MLflow run + registry."""

import json

import pytest
import torch
from safetensors.torch import load_file

from xlpeft import load_module, tracking
from xlpeft.errors import XlpeftError
from xlpeft.methods.adapters import AdapterConfig, AdapterModule
from xlpeft.models import load_base
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.tracking.flavor import MODEL_FILES

MODEL_ARTIFACTS = [f"module/{name}" for name in MODEL_FILES]  # a module folder is an MLflow Model


@pytest.fixture(params=["tiny-bert", "tiny-xlmr"])
def trained(request, workdir, base_dirs, sw_corpus):
    base_dir = base_dirs[request.param]
    before = {k: v.clone() for k, v in load_file(str(base_dir / "model.safetensors")).items()}
    req = LangRequest(lang="sw", base=str(base_dir), corpus=(str(sw_corpus),),
                      sets={"max_steps": "12", "max_seq_len": "32", "lr": "1e-2", "log_every": "4", "eval_every": "6"})
    result = train_language(req)
    return result, base_dir, before


def test_base_untouched_and_only_adapters_changed(trained):
    result, base_dir, before = trained
    after = load_file(str(base_dir / "model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"base tensor {k} changed on disk"
    module = load_module(result.path)
    # a fresh module built with the same seed is the initial state; training must have moved it
    base = load_base(str(base_dir))
    torch.manual_seed(42)
    init = AdapterModule(AdapterConfig(), base.hidden_size, len(base.layers)).state_dict()
    trained_state = module.tensors["adapter"]
    assert trained_state.keys() == init.keys()
    changed = [k for k in init if not torch.equal(init[k], trained_state[k])]
    assert any(".up." in k for k in changed), "zero-initialised up-projections should have learned"
    assert any(k.startswith("invertible.") for k in changed)
    assert module.manifest.trainable_parameters == sum(t.numel() for t in init.values())
    # the in-memory base used for training stays frozen too
    assert all(not p.requires_grad for p in base.model.parameters())


def test_manifest_records_base_and_training(trained):
    result, base_dir, _ = trained
    manifest = json.loads((result.path / "xlpeft.json").read_text())
    assert manifest["kind"] == "language" and manifest["lang"] == "sw" and manifest["method"] == "adapter"
    assert manifest["base"]["fingerprint"] == load_base(str(base_dir)).fingerprint
    assert manifest["config"]["reduction_factor"] == 2.0 and manifest["config"]["invertible"] is True
    assert manifest["training"]["steps"] == 12
    assert manifest["training"]["eval_loss"] < manifest["training"]["eval_loss_before"]


def test_mlflow_run_tags_params_metrics_artifacts_and_registry(trained):
    result, base_dir, _ = trained
    client = tracking.client()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["xlpeft.kind"] == "language" and tags["xlpeft.lang"] == "sw"
    assert tags["xlpeft.method"] == "adapter" and tags["xlpeft.task"] == "none"
    assert tags["xlpeft.base"] == str(base_dir)
    assert tags["xlpeft.base_fingerprint"] == load_base(str(base_dir)).fingerprint
    params = run.data.params
    assert params["method.reduction_factor"] == "2.0" and params["train.lr"] == "0.01"
    assert params["train.max_seq_len"] == "32"
    loss_history = client.get_metric_history(result.run_id, "loss")
    assert [m.step for m in loss_history] == [4, 8, 12]
    assert {"eval_loss", "eval_perplexity", "eval_loss_before", "lr"} <= set(run.data.metrics)
    assert len(client.get_metric_history(result.run_id, "eval_loss")) == 2  # step 6 and the end
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "module")}
    assert artifacts == {"module/xlpeft.json", "module/adapter.safetensors", *MODEL_ARTIFACTS}
    assert result.registered_name == "xlpeft-lang-sw-adapter"
    path, version = tracking.find_reference("xlpeft-lang-sw-adapter", load_base(str(base_dir)).fingerprint)
    assert version.run_id == result.run_id
    downloaded = load_module(path)
    for k, v in load_module(result.path).tensors["adapter"].items():
        assert torch.equal(downloaded.tensors["adapter"][k], v)
    with pytest.raises(Exception, match="no registered language module"):
        tracking.find_reference("xlpeft-lang-sw-adapter", "otherbase")


def test_same_seed_same_module(workdir, base_dirs, sw_corpus, capsys):
    """The second run reads the token cache and the cached loss before training, and still trains the same module."""
    def run(out):
        req = LangRequest(lang="sw", base=str(base_dirs["tiny-bert"]), corpus=(str(sw_corpus),),
                          output=str(workdir / out), sets={"max_steps": "5", "max_seq_len": "32", "lr": "1e-2"})
        module = load_module(train_language(req).path)
        return module.tensors["adapter"], module.manifest.training, capsys.readouterr().err

    (a, train_a, err_a), (b, train_b, err_b) = run("a"), run("b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "token cache built" in err_a and "token cache hit" in err_b and "token cache built" not in err_b
    assert "before training: from the cache" in err_b and "from the cache" not in err_a
    assert train_a["eval_loss_before"] == train_b["eval_loss_before"] and train_a["eval_loss"] == train_b["eval_loss"]
    versions = tracking.list_versions("xlpeft-lang-sw-adapter")
    assert [v.version for v in versions] == ["2", "1"]


def test_the_held_out_evaluation_is_sized_to_the_run(workdir, base_dirs, sw_corpus):
    req = LangRequest(lang="sw", base=str(base_dirs["tiny-bert"]), corpus=(str(sw_corpus),),
                      sets={"max_steps": "3", "max_seq_len": "16", "batch_size": "2", "eval_fraction": "0.5"})
    params = tracking.client().get_run(train_language(req).run_id).data.params
    assert int(params["eval_blocks"]) > 8 and params["eval_blocks_used"] == "8", "4 batches of 2: the automatic minimum"


def test_an_hf_corpus_is_streamed(workdir, base_dirs, tmp_path, capsys):
    """``hf:`` corpora stream by default (a local dataset folder stands in for the hub, offline)."""
    folder = tmp_path / "hfds"
    folder.mkdir()
    rows = [{"text": f"watu wote wamezaliwa huru {i} hadhi na haki zao ni sawa"} for i in range(200)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    req = LangRequest(lang="sw", base=str(base_dirs["tiny-xlmr"]), corpus=(f"hf:{folder}",),
                      sets={"max_steps": "4", "max_seq_len": "32", "lr": "1e-2"})
    result = train_language(req)
    err = capsys.readouterr().err
    assert "stream: reading" in err and "token cache" not in err
    params = tracking.client().get_run(result.run_id).data.params
    assert params["train_blocks"] == "stream" and params["eval_blocks_used"] == "32"
    assert load_module(result.path).manifest.training["steps"] == 4
    with pytest.raises(XlpeftError, match="full_epochs.*corpus_mode=cache"):
        train_language(LangRequest(lang="sw", method="sft", base=str(base_dirs["tiny-xlmr"]), corpus=(f"hf:{folder}",),
                                   sets={"full_epochs": "1", "num_params": "100"}))
