"""A third method, defined and registered here only, driven through the whole CLI.

The issue's proof that a method is a plug-in: ``scale`` (a learned vector multiplying each
layer's FFN output, initialised to 1 so it starts as the identity) trains, saves, composes
(with itself and with adapters), resumes and is refused by the converters with no edit outside
this file. Everything generic code needs comes from its :class:`~xlpeft.methods.base.MethodSpec`.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import SW_WORDS, make_lines, make_ner, use_store, write_conll
from tests.hostile.conftest import interrupt_after_checkpoint, run_cli
from tests.methods import test_contract as contract
from xlpeft import compose, load_module
from xlpeft.cli import main
from xlpeft.config import build, check_fields
from xlpeft.errors import XlpeftError
from xlpeft.methods.base import MODULE_KINDS, AppliedModule, MethodSpec, ModuleTrainable, Phase
from xlpeft.models import get_submodule, load_base
from xlpeft.registry import get_method, method_names, register_method, unregister_method

NAME = "scale"


# ---- the method: config, module, injection, training and applying, spec

@dataclass(frozen=True)
class ScaleConfig:
    """A learned per-layer vector s_l (H,) multiplying the FFN sub-layer's output: h_l <- s_l * h_l."""

    init: float = field(default=1.0, metadata={"help": "initial value of every scale (1: the module is the identity)",
                                               "gt": 0.0})

    def __post_init__(self) -> None:
        check_fields(self)


class ScaleModule(nn.Module):
    def __init__(self, config: ScaleConfig, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.scales = nn.Parameter(torch.full((num_layers, hidden_size), float(config.init)))  # (L, H)


def hook_scales(base, module: ScaleModule):
    """A forward hook per layer on the FFN output sub-layer (its LayerNorm'd output, (B, T, H)); returns ``detach``."""
    handles = []
    for i, layer in enumerate(base.layers):
        sub = get_submodule(layer, base.arch.ffn_output)
        handles.append(sub.register_forward_hook(lambda mod, args, out, i=i: out * module.scales[i]))

    def detach() -> None:
        while handles:
            handles.pop().remove()

    return detach


def prepare_scale(base, config: ScaleConfig, train_cfg) -> ModuleTrainable:
    device = next(base.model.parameters()).device
    module = ScaleModule(config, base.hidden_size, len(base.layers)).to(device)
    return ModuleTrainable(module, hook_scales(base, module), Phase(NAME, train_cfg.max_steps), NAME)


def apply_scale(base, loaded) -> AppliedModule:
    module = ScaleModule(build(ScaleConfig, loaded.manifest.config), base.hidden_size, len(base.layers))
    if NAME not in loaded.tensors:
        raise XlpeftError(f"scale module {loaded.path} has no {NAME}.safetensors")
    module.load_state_dict(loaded.tensors[NAME], strict=True)
    module.to(next(base.model.parameters()).device).requires_grad_(False)
    return AppliedModule(module, hook_scales(base, module), NAME)


SPEC = MethodSpec(
    name=NAME, config_cls=ScaleConfig, prepare=prepare_scale, apply=apply_scale, combine="stack",
    help="a learned per-layer vector scaling each FFN output (a test plug-in)",
    train_defaults=lambda kind: {"lr": 1e-2}, files=(NAME,),
)


@pytest.fixture(scope="module")
def scale_method():
    register_method(SPEC)
    yield SPEC
    unregister_method(NAME)


# ---- a store trained through the CLI, shared by the tests below

def _cli(*args: str) -> tuple[str, str]:
    """Run ``xlpeft ARGS`` in-process (usable from module-scoped fixtures); it must succeed. Returns (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            raise AssertionError(f"xlpeft {' '.join(map(str, args))} exited {exc.code}: {err.getvalue()[-3000:]}") from None
    return out.getvalue(), err.getvalue()


def _lang_args(base: str, corpus: Path, method: str, *extra: str) -> list[str]:
    return ["train-lang", "--lang", "sw", "--method", method, "--base", base, "--corpus", str(corpus),
            "--max-steps", "4", "--set", "max_seq_len=32", *extra]


def _task_args(root: Path, base: str, *extra: str) -> list[str]:
    return ["train-task", "--task", "ner", "--lang", "sw", "--method", NAME, "--base", base, "--train-data",
            str(root / "train.conll"), "--eval-data", str(root / "eval.conll"), "--max-steps", "4",
            "--set", "max_seq_len=32", *extra]


@pytest.fixture(scope="module")
def store(scale_method, tmp_path_factory, base_dirs):
    """Through the CLI: sw language modules (scale, adapter) and NER scale task modules over each."""
    root = tmp_path_factory.mktemp("plugin")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        base = str(base_dirs["tiny-bert"])
        corpus = root / "sw.txt"
        corpus.write_text("\n".join(make_lines(SW_WORDS, 150)) + "\n", encoding="utf-8")
        write_conll(root / "train.conll", make_ner(60, seed=1))
        write_conll(root / "eval.conll", make_ner(20, seed=2))
        runs = {
            "lang-scale": _cli(*_lang_args(base, corpus, NAME)),
            "lang-adapter": _cli(*_lang_args(base, corpus, "adapter", "--set", "lr=1e-2")),
            # lang_module=auto: the task module's own method first, so the scale language module
            "task-over-scale": _cli(*_task_args(root, base, "--output", "modules/task-over-scale")),
            "task-over-adapter": _cli(*_task_args(root, base, "--output", "modules/task-over-adapter",
                                                  "--set", f"lang_module={root / 'modules/lang-sw-adapter'}")),
        }
        yield {"root": root, "base": base, "corpus": corpus, "runs": runs}


@pytest.fixture
def env(store, monkeypatch):
    use_store(monkeypatch, store["root"])
    return store


def _ids(base) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, len(base.tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _tags(run_id: str) -> dict[str, str]:
    from xlpeft import tracking

    return tracking.client().get_run(run_id).data.tags


# ---- train

def test_train_lang_trains_saves_and_registers_a_scale_module(env):
    out, _ = env["runs"]["lang-scale"]
    assert "language module sw/scale" in out and "registered as xlpeft-lang-sw-scale version 1" in out
    module = load_module(env["root"] / "modules/lang-sw-scale")
    assert module.manifest.method == NAME and module.manifest.kind == "language"
    assert module.manifest.config == {"init": 1.0}
    assert module.manifest.training["train"]["lr"] == 1e-2, "the spec's per-kind training default reached TrainConfig"
    assert list(module.tensors) == [NAME] and module.manifest.files == [f"{NAME}.safetensors"]
    scales = module.tensors[NAME]["scales"]
    base = load_base(env["base"])
    assert scales.shape == (len(base.layers), base.hidden_size) and not torch.equal(scales, torch.ones_like(scales)), "training moved the scales"
    assert module.manifest.trainable_parameters == scales.numel()


def test_train_task_over_the_scale_and_over_an_adapter_language_module(env):
    _, err = env["runs"]["task-over-scale"]
    assert "lang_module=auto: xlpeft-lang-sw-scale version 1 (the scale language module" in err
    over_scale = load_module(env["root"] / "modules/task-over-scale")
    over_adapter = load_module(env["root"] / "modules/task-over-adapter")
    for module, lang_method in ((over_scale, NAME), (over_adapter, "adapter")):
        assert module.manifest.kind == "task" and module.manifest.method == NAME
        assert module.manifest.extra["lang_module"]["method"] == lang_method
        assert set(module.tensors) == {NAME, "head"}
        assert module.manifest.extra["labels"][0] == "O"
    assert not torch.equal(over_scale.tensors[NAME]["scales"], over_adapter.tensors[NAME]["scales"])


# ---- compose

def _compose(env, capsys, lang_method: str, output: Path) -> tuple[str, dict[str, str]]:
    out = run_cli(capsys, "compose", "--lang", "sw", "--task", "ner", "--base", env["base"], "--lang-method", lang_method,
                  "--task-method", NAME, "--eval-data", env["root"] / "eval.conll", "--output", output)
    assert out.code == 0, out.err[-3000:]
    assert "zero-shot ner on sw" in out.out and f"composed model written to {output}" in out.out
    return out.out, _tags(out.out.strip().split()[-1])


def _manual_logits(base, lang, task, batch) -> torch.Tensor:
    """Both scale modules by hand: one hook per layer multiplying by s_lang * s_task, the task head on top."""
    from xlpeft.composed import target_model

    model = target_model(base, task).eval()
    product = lang.tensors[NAME]["scales"] * task.tensors[NAME]["scales"]  # (L, H)
    layers = get_submodule(model, base.arch.layers)
    handles = [get_submodule(layer, base.arch.ffn_output).register_forward_hook(
        lambda mod, args, out, i=i: out * product[i]) for i, layer in enumerate(layers)]
    with torch.no_grad():
        logits = model(**batch).logits
    for h in handles:
        h.remove()
    return logits


def test_compose_scale_with_scale_saves_and_reloads(env, capsys, tmp_path):
    out_dir = tmp_path / "composed"
    _, tags = _compose(env, capsys, NAME, out_dir)
    assert tags["xlpeft.method"] == "scale+scale"
    lang_ref, task_ref = tags["xlpeft.parent.lang_module"], tags["xlpeft.parent.task_module"]
    assert lang_ref == "xlpeft-lang-sw-scale@1" and task_ref == "xlpeft-task-ner-scale@2"
    base = load_base(env["base"])
    model = compose(base, [lang_ref, task_ref])
    assert model.xlpeft_composition.describe() == "stack(language:sw/scale, task:ner/scale)"
    assert len(model.xlpeft_modules) == 2, "both scale modules are owned by the composed model"
    reloaded = compose(out_dir, [])  # the written directory: checkpoint + modules/<i> re-applied
    assert sorted(p.name for p in (out_dir / "modules").iterdir()) == ["0", "1"]
    assert (out_dir / "modules/1" / f"{NAME}.safetensors").is_file()
    batch = _ids(base)
    lang = load_module(env["root"] / "modules/lang-sw-scale")
    task = load_module(env["root"] / "modules/task-over-adapter")  # version 2 of xlpeft-task-ner-scale
    with torch.no_grad():
        got, again = model(**batch).logits, reloaded(**batch).logits
    torch.testing.assert_close(got, _manual_logits(base, lang, task, batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=1e-6)


def test_compose_hybrid_adapter_under_scale(env, capsys, tmp_path):
    out_dir = tmp_path / "hybrid"
    _, tags = _compose(env, capsys, "adapter", out_dir)
    assert tags["xlpeft.method"] == "adapter+scale"
    base = load_base(env["base"])
    model = compose(base, [tags["xlpeft.parent.lang_module"], tags["xlpeft.parent.task_module"]])
    assert model.xlpeft_composition.describe() == "stack(language:sw/adapter, task:ner/scale)"
    reloaded = compose(out_dir, [])
    batch = _ids(base)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)


def test_compose_three_modules_with_the_plug_in_in_the_middle(env, capsys, tmp_path):
    """``compose --module``: adapter language module, the scale language module above it, the scale task module on top."""
    out_dir, middle = tmp_path / "three", env["root"] / "modules/lang-sw-scale"
    out = run_cli(capsys, "compose", "--lang", "sw", "--task", "ner", "--base", env["base"], "--lang-method", "adapter",
                  "--module", middle, "--task-method", NAME, "--eval-data", env["root"] / "eval.conll",
                  "--output", out_dir)
    assert out.code == 0, out.err[-3000:]
    base = load_base(env["base"])
    tags = _tags(out.out.strip().split()[-1])
    model = compose(base, [tags["xlpeft.parent.lang_module"], str(middle), tags["xlpeft.parent.task_module"]])
    assert model.xlpeft_composition.describe() == "stack(language:sw/adapter, language:sw/scale, task:ner/scale)"
    assert tags["xlpeft.composition"] == model.xlpeft_composition.describe()
    reloaded = compose(out_dir, [])
    assert reloaded.xlpeft_composition.describe() == model.xlpeft_composition.describe()
    batch = _ids(base)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)


# ---- resume, list, convert

def test_interrupted_scale_run_resumes_to_the_uninterrupted_module(scale_method, workdir, base_dirs, sw_corpus,
                                                                   capsys, monkeypatch):
    from xlpeft import tracking

    base = str(base_dirs["tiny-bert"])
    args = _lang_args(base, sw_corpus, NAME, "--max-steps", "6", "--set", "checkpoint_every=2")
    ref = run_cli(capsys, *args, "--output", workdir / "ref")
    assert ref.code == 0, ref.err[-3000:]
    restore = interrupt_after_checkpoint(monkeypatch)
    first = run_cli(capsys, *args, "--output", workdir / "crashed")
    assert first.code == 130, first.err[-3000:]
    assert not (workdir / "crashed").exists()
    restore()
    resumed = run_cli(capsys, *args, "--output", workdir / "crashed", "--resume")
    assert resumed.code == 0, resumed.err[-3000:]
    assert re.search(r"resuming MLflow run \w+ at step 2", resumed.err), resumed.err[-2000:]
    a, b = load_module(workdir / "ref"), load_module(workdir / "crashed")
    torch.testing.assert_close(b.tensors[NAME]["scales"], a.tensors[NAME]["scales"], rtol=0, atol=1e-6)
    assert not torch.equal(a.tensors[NAME]["scales"], torch.ones_like(a.tensors[NAME]["scales"]))
    assert [v.version for v in tracking.list_versions("xlpeft-lang-sw-scale")] == ["2", "1"]


def test_methods_lists_the_plug_in_with_its_set_keys(scale_method, capsys):
    out = run_cli(capsys, "methods")
    assert out.code == 0, out.err
    assert NAME in method_names() and get_method(NAME) is scale_method
    block = out.out.split(f"{NAME}: ", 1)[1].split("training (all methods):")[0]
    assert block.startswith(SPEC.help)
    assert re.search(r"--set init=1\.0\s+initial value of every scale", block)
    assert "combines by stack" in block and "language modules default to: lr=0.01" in block
    with pytest.raises(XlpeftError, match="already registered"):
        register_method(SPEC)


@pytest.mark.parametrize("fmt", ["adapterhub", "composable-sft"])
def test_convert_refuses_the_plug_in_by_name(env, capsys, tmp_path, fmt):
    src = env["root"] / "modules/lang-sw-scale"
    out = run_cli(capsys, "convert", src, tmp_path / "out", "--from", "xlpeft", "--to", fmt, "--base", env["base"])
    errors = [line for line in out.err.splitlines() if line.startswith("Error:")]
    assert out.code == 2 and len(errors) == 1, out.err[-2000:]
    assert "'scale'" in errors[0] and "unexpected" not in errors[0] and "Traceback" not in out.err
    assert not (tmp_path / "out").exists()


# ---- the method-contract table, run for the plug-in (its rows are generated for registered methods at collection)

trained, fresh = contract.trained, contract.fresh  # the contract's fixtures, for this module


def test_the_plug_in_meets_the_method_contract(scale_method, trained, fresh, tmp_path):
    for kind in MODULE_KINDS:
        contract.test_untrained_module_is_the_identity(fresh, tmp_path / f"untrained-{kind}", NAME, kind)
        contract.test_save_load_round_trip_gives_the_trained_outputs(trained, fresh, tmp_path / kind, NAME, kind)
        contract.test_resume_phase_rebuilds_the_module_where_state_dict_left_it(fresh, NAME, kind)
    for arch in contract.ARCHS:
        contract.test_apply_then_remove_restores_the_base_bit_exactly(trained, fresh, arch, NAME)
    for other in method_names():
        for lower, upper in ((NAME, other), (other, NAME)):
            contract.test_removed_out_of_order_leaves_what_the_other_alone_gives(trained, fresh, lower, upper)
            contract.test_every_method_composes_under_every_method(trained, fresh, tmp_path / f"{lower}-{upper}",
                                                                   lower, upper)
    contract.test_check_leaves_the_base_and_the_random_stream_alone(fresh, NAME)
    contract.test_the_spec_is_complete(trained, NAME)
