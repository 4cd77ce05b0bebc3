"""AdapterFusion beyond the contract rows: its function, its regulariser, its refusals, and train-task --method fusion.

The contract (``test_contract.py``) runs the fusion row like every method; the AdapterHub equality of
its logits, both ways, is ``tests/interop/test_adapterhub_fusion.py``.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from tests.methods.fused_inputs import fused_adapters
from tests.methods.test_contract import outputs, probe
from xlpeft import load_module
from xlpeft.compose import compose
from xlpeft.config import TrainConfig
from xlpeft.errors import XlpeftError
from xlpeft.io import Manifest, save_module
from xlpeft.methods.adapters import AdapterConfig, AdapterModule, attach_adapters
from xlpeft.methods.fusion import FusionConfig, prepare_fusion
from xlpeft.models import load_base
from xlpeft.recipes.common import resolve_configs


def _fused(base) -> list[AdapterModule]:
    return [m for m in prepare_fusion(base, FusionConfig(fuse=fused_adapters(base)), TrainConfig(max_steps=1)).module.fused]


def test_zero_scores_and_an_identity_value_average_the_adapters(base_dirs):
    """q.k = 0 everywhere and W_v = I: every site adds the mean of what each adapter alone would add."""
    base = load_base(str(base_dirs["tiny-bert"]))
    trainable = prepare_fusion(base, FusionConfig(fuse=fused_adapters(base)), TrainConfig(max_steps=1))
    module = trainable.module
    with torch.no_grad():
        for block in module.layers:
            for layer in block.values():
                layer.query.weight.zero_()
                layer.query.bias.zero_()
                layer.value.weight.copy_(torch.eye(base.hidden_size))
    ids = probe(base)
    got = outputs(base, ids)
    trainable.close()

    class Mean(AdapterModule):  # the hand computation: h + (u_1 + u_2) / 2 with the first one's invertible adapter
        def apply_at(self, layer, site, h, x, layer_norm):
            ups = [m.up_at(layer, site, h, x, layer_norm) for m in module.fused]
            return h + sum(ups) / len(ups)

    mean = Mean(AdapterConfig(reduction_factor=4), base.hidden_size, len(base.layers))
    mean.invertible = module.fused[0].invertible
    hooks = attach_adapters(base.model, base.arch, [mean])
    expected = outputs(base, ids)
    hooks.remove()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    hooks = attach_adapters(base.model, base.arch, [module.fused[0]])
    assert not torch.allclose(outputs(base, ids), expected, atol=1e-3), "the fusion is not just its first adapter"
    hooks.remove()


@pytest.mark.parametrize("accum", [1, 4])
def test_the_value_regulariser_adds_its_gradient_once_per_step(base_dirs, accum):
    """d/dW r||W - I||^2 = 2r(W - I), split over the micro-batches of a step (AdapterHub adds r||W - I||^2 once a step)."""
    base = load_base(str(base_dirs["tiny-bert"]))
    cfg = FusionConfig(fuse=fused_adapters(base), regularization=0.05)
    trainable = prepare_fusion(base, cfg, TrainConfig(max_steps=1, grad_accum=accum))
    params = trainable.begin_phase(trainable.phases[0])
    layer = trainable.module.layers[0]["ffn"]
    with torch.no_grad():
        layer.value.weight.add_(0.1 * torch.randn(layer.value.weight.shape, generator=torch.Generator().manual_seed(0)))
    for _ in range(accum):
        (0.0 * sum(p.sum() for p in params)).backward()  # no loss gradient: only the regulariser's
    want = 2 * 0.05 * (layer.value.weight.detach() - torch.eye(base.hidden_size))
    torch.testing.assert_close(layer.value.weight.grad, want, rtol=1e-6, atol=1e-7)
    assert layer.query.weight.grad is not None and not layer.query.weight.grad.any()
    trainable.close()


def test_only_the_fusion_layers_train(base_dirs):
    base = load_base(str(base_dirs["tiny-bert"]))
    trainable = prepare_fusion(base, FusionConfig(fuse=fused_adapters(base)), TrainConfig(max_steps=1))
    params = trainable.begin_phase(trainable.phases[0])
    keys = {id(p) for n, p in trainable.module.layers.named_parameters() if n.endswith("key.bias")}
    assert keys and {id(p) for p in params} == {id(p) for p in trainable.module.layers.parameters()} - keys, \
        "every fusion parameter but the key biases, whose gradient the softmax makes exactly zero"
    assert not any(p.requires_grad for m in trainable.module.fused for p in m.parameters())
    assert set(trainable.state_dict()) == set(trainable.module.layers.state_dict())
    tensors, extra = trainable.export()
    assert extra["trainable_parameters"] == sum(p.numel() for p in params)
    assert [r["method"] for r in extra["fused"]] == ["adapter", "adapter"]
    assert any(k.startswith("fused.1.") for k in tensors["fusion"])
    trainable.close()


def _module(base, tmp_path, name, method="adapter", **config):
    from xlpeft.registry import get_method

    spec = get_method(method)
    cfg = spec.config_cls(**config)
    manifest = Manifest(kind="language", method=method, config=asdict(cfg), lang=name,
                        base={"name": base.name, "fingerprint": base.fingerprint, "model_type": base.model.config.model_type})
    trainable = spec.prepare(base, cfg, TrainConfig(max_steps=1))
    tensors, _ = trainable.export()
    trainable.close()
    return str(save_module(tmp_path / name, manifest, tensors))


def test_what_cannot_be_fused_is_refused_by_name(base_dirs, tmp_path):
    base = load_base(str(base_dirs["tiny-bert"]))
    a = _module(base, tmp_path, "a")
    with pytest.raises(XlpeftError, match="at least two modules"):
        resolve_configs("fusion", "task", {"fuse": a})
    with pytest.raises(XlpeftError, match="at least two modules"):
        get_spec().plan(FusionConfig(), TrainConfig(), None)
    with pytest.raises(XlpeftError, match="names a module twice"):
        FusionConfig(fuse=f"{a},{a}")
    lora = _module(base, tmp_path, "l", method="lora")
    with pytest.raises(XlpeftError, match=r"it is a lora module; AdapterFusion fuses sequential bottleneck modules \(adapter, compacter"):
        prepare_fusion(base, FusionConfig(fuse=f"{a},{lora}"), TrainConfig(max_steps=1))
    houlsby = _module(base, tmp_path, "h", placement="houlsby")
    with pytest.raises(XlpeftError, match="of one placement; got placements"):
        prepare_fusion(base, FusionConfig(fuse=f"{a},{houlsby}"), TrainConfig(max_steps=1))
    other = load_base(str(base_dirs["tiny-xlmr"]))
    with pytest.raises(XlpeftError, match="fingerprint"):
        prepare_fusion(other, FusionConfig(fuse=f"{a},{houlsby}"), TrainConfig(max_steps=1))
    with pytest.raises(XlpeftError, match="neither a directory nor a registered name"):
        prepare_fusion(base, FusionConfig(fuse=f"{a},no-such-dir"), TrainConfig(max_steps=1))
    with pytest.raises(XlpeftError, match="at least one of query, key, value"):
        FusionConfig(fuse="x,y", query=False, key=False, value=False)


def get_spec():
    from xlpeft.registry import get_method

    return get_method("fusion")


def test_a_fusion_module_is_self_contained(base_dirs, tmp_path, workdir):
    """Trained, saved and the fused modules' directories deleted: it still composes to what it gave."""
    import shutil

    from tests.methods.test_contract import train_and_save

    base = load_base(str(base_dirs["tiny-bert"]))
    a, b = _module(base, tmp_path, "a", reduction_factor=4), _module(base, tmp_path, "b", reduction_factor=8)
    gen = torch.Generator().manual_seed(3)
    for path in (a, b):  # non-zero up-projections, so there is something to fuse
        module = load_module(path)
        state = {k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in module.tensors["adapter"].items()}
        save_module(path, module.manifest, {"adapter": state})
    path, when_trained, _ = train_and_save(base, "fusion", "language", tmp_path / "fusion", name="xx")
    manifest = json.loads((path / "xlpeft.json").read_text())
    assert [r["source"] for r in manifest["extra"]["fused"]] == fused_adapters(base).split(",")
    shutil.rmtree(tmp_path / "a")
    model = compose(str(base_dirs["tiny-bert"]), [path])
    ids = probe(base)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, when_trained, rtol=0, atol=1e-6)


def test_train_task_with_method_fusion_through_the_cli(workdir, base_dirs, ner_files, tmp_path, capsys):
    """Two task adapters, then a fusion of them with a new head: trained, registered, composed, and evaluated."""
    from xlpeft.cli import main

    base_dir = str(base_dirs["tiny-bert"])
    common = ["--task", "ner", "--lang", "en", "--base", base_dir, "--train-data", str(ner_files["train"]),
              "--eval-data", str(ner_files["eval"]), "--set", "lang_module=none", "--set", "max_seq_len=32",
              "--max-steps", "6", "--batch-size", "8"]
    for i in (1, 2):
        main(["train-task", *common, "--seed", str(i), "--set", "lr=3e-3", "--output", str(tmp_path / f"t{i}")])
    fuse = f"{tmp_path / 't1'},{tmp_path / 't2'}"
    main(["train-task", *common, "--method", "fusion", "--set", f"fuse={fuse}", "--output", str(tmp_path / "fused")])
    m = load_module(tmp_path / "fused").manifest
    assert (m.kind, m.method, m.task) == ("task", "fusion", "ner")
    assert m.training["train"]["lr"] == 5e-5, "AdapterFusion's learning rate is the default"
    out = capsys.readouterr().out
    assert "registered as xlpeft-task-ner-fusion version 1" in out
    model = compose(base_dir, ["xlpeft-task-ner-fusion"])
    assert model.xlpeft_composition.methods() == "fusion"
    from xlpeft import tracking  # lineage: the fused modules are the fusion's parents, on the run and the version

    c = tracking.client()
    version = c.get_model_version("xlpeft-task-ner-fusion", "1")
    parents = [str(tmp_path / "t1"), str(tmp_path / "t2")]
    run_tags = c.get_run(version.run_id).data.tags
    assert [run_tags.get(f"xlpeft.parent.{i}") for i in (0, 1)] == parents
    assert [version.tags.get(f"xlpeft.parent.{i}") for i in (0, 1)] == parents
    assert f"parent modules: {parents[0]}, {parents[1]}" in version.description
    assert len(m.extra["fused"]) == 2 and m.trainable_parameters < sum(
        t.numel() for t in load_module(tmp_path / "fused").tensors["fusion"].values())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["train-task", *common, "--method", "fusion", "--set", "fuse=" + str(tmp_path / "t1"),
              "--output", str(tmp_path / "bad")])
    assert exit_info.value.code == 2  # a usage error, as every bad --set value
    err = capsys.readouterr().err
    assert "at least two modules" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
