"""Composition blocks as data: the nesting table, combine rules, records and format versions, three-module stacks."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from tests.methods.test_contract import LABELS, assert_restored, is_tied, probe, snapshot, train_and_save
from xlpeft.compose import (
    ALLOWED,
    BLOCKS,
    COMBINES_IN,
    FORMAT_VERSION,
    Average,
    Composition,
    Fuse,
    ModuleRef,
    Stack,
    Sum,
    activate,
    compose,
)
from xlpeft.composed import COMPOSITION_FILE, load_composed, save_composed
from xlpeft.errors import XlpeftError
from xlpeft.io import load_module
from xlpeft.methods.heads import build_head
from xlpeft.methods.sft import SparseDelta
from xlpeft.models import load_base
from xlpeft.registry import get_method, method_names

FP = "0123456789abcdef"


def method_combining(combine: str) -> str:
    """The built-in method whose modules combine by ``combine`` as these tests read them (``stack``: adapter, ``sum``: sft)."""
    method = {"stack": "adapter", "sum": "sft"}[combine]
    assert get_method(method).combine == combine
    return method


def ref(combine: str = "stack", kind: str = "language", name: str = "sw") -> ModuleRef:
    method = method_combining(combine)
    return ModuleRef(kind, method, name, f"modules/{kind}-{name}-{method}")


def valid(block: str) -> Stack | Sum | Fuse | Average:
    """A small valid block of each kind, to nest in another."""
    combine = "sum" if block == "sum" else "stack"
    return BLOCKS[block](ref(combine, name="a"), ref(combine, name="b"))


def child_for(outer: str, inner: str):
    if inner == "module":
        return ref(COMBINES_IN[outer][0])
    return valid(inner)


@pytest.mark.parametrize("outer", list(BLOCKS))
@pytest.mark.parametrize("inner", ["module", *BLOCKS])
def test_nesting_table(outer, inner):
    child = child_for(outer, inner)
    if inner in ALLOWED[outer]:
        block = BLOCKS[outer](child, ref(COMBINES_IN[outer][0], name="other"))
        assert block.children[0] == child and block.leaves()[0] in child.leaves()
    else:
        with pytest.raises(XlpeftError) as err:
            BLOCKS[outer](child)
        assert f"a {outer} block cannot hold a {inner} block" in str(err.value)


def test_the_table_is_complete_and_lets_every_executable_shape_build():
    assert set(ALLOWED) == set(BLOCKS) == set(COMBINES_IN)
    assert all(set(held) <= {"module", *BLOCKS} for held in ALLOWED.values())
    Stack(Sum(ref("sum"), ref("sum", name="domain")), ref("stack", "task", "ner"))  # MAD-X over summed deltas


def test_a_sum_module_sits_in_a_stack_but_a_stack_module_not_in_a_sum():
    Stack(ref("sum"), ref("stack", "task", "ner"))
    adapter = method_combining("stack")
    with pytest.raises(XlpeftError) as err:
        Sum(ref("sum"), ref("stack", "task", "ner"))
    message = str(err.value)
    assert "a sum block cannot hold" in message and f"{adapter} modules combine by stack" in message
    assert "Stack block" in message
    with pytest.raises(XlpeftError, match="at least one"):
        Stack()


def test_record_round_trip_with_nesting():
    composition = Composition(Stack(Sum(ref("sum"), ref("sum", name="legal")), ref("stack", name="dom"),
                                    ref("stack", "task", "ner")), FP)
    record = json.loads(json.dumps(composition.to_dict()))
    assert record["format_version"] == FORMAT_VERSION and record["base_fingerprint"] == FP
    again = Composition.from_dict(record)
    assert again == composition and again.describe() == composition.describe()
    assert [leaf.name for leaf in again.leaves()] == ["sw", "legal", "dom", "ner"]


def test_a_version_2_record_reads_without_adapter_drop():
    composition = Composition(Stack(ref(), ref("stack", "task", "ner")), FP, adapter_drop=2)
    record = composition.to_dict()
    assert record["adapter_drop"] == 2 and Composition.from_dict(record) == composition
    old = {k: v for k, v in record.items() if k != "adapter_drop"} | {"format_version": 2}
    assert Composition.from_dict(old) == Composition(composition.root, FP)  # format 2 had no AdapterDrop


@pytest.mark.parametrize("version", [4, 99, "2"])
def test_an_unknown_format_version_is_refused_by_name(version):
    record = {**Composition(Stack(ref()), FP).to_dict(), "format_version": version}
    with pytest.raises(XlpeftError) as err:
        Composition.from_dict(record)
    assert f"format version {version!r}" in str(err.value) and "upgrade xlpeft" in str(err.value)


def test_bad_records_name_what_is_wrong():
    with pytest.raises(XlpeftError, match="unknown composition block 'parallel'; known blocks: stack, sum"):
        Composition.from_dict({"format_version": FORMAT_VERSION, "base_fingerprint": FP,
                               "root": {"parallel": [ref().to_dict()]}})
    with pytest.raises(XlpeftError, match="unknown method 'nosuch'"):
        ModuleRef("language", "nosuch", "sw", "x")
    with pytest.raises(XlpeftError, match="holds language and task modules"):
        ModuleRef("composition", method_combining("stack"), "sw", "x")


def test_the_task_module_must_be_on_top_and_alone():
    lang, task = ref(), ref(kind="task", name="ner")
    with pytest.raises(XlpeftError, match="must sit on top"):
        Composition(Stack(task, lang), FP)
    with pytest.raises(XlpeftError, match="must sit on top"):
        Composition(Stack(ref(name="legal"), task, lang), FP)
    with pytest.raises(XlpeftError, match="at most one task module; got 2"):
        Composition(Stack(lang, task, ref(kind="task", name="pos")), FP)
    Composition(Stack(lang, ref(name="legal"), task), FP)


# ---- executing compositions on a tiny base

@pytest.fixture(scope="module")
def modules(tmp_path_factory, base_dirs):
    """Per method: a language module (sw), a second language-kind "domain" module (legal) and a task module (ner)."""
    root = tmp_path_factory.mktemp("blocks")
    base = load_base(str(base_dirs["tiny-bert"]))
    out = {}
    for method in method_names():
        for role, kind, seed, name in (("lang", "language", 0, "sw"), ("domain", "language", 1, "legal"),
                                       ("task", "task", 2, "ner")):
            path = train_and_save(base, method, kind, root / f"{method}-{role}", seed=seed, name=name)[0]
            out[method, role] = load_module(path)
    return out


@pytest.fixture
def base(base_dirs):
    return load_base(str(base_dirs["tiny-bert"]))


def _batch(base) -> dict[str, torch.Tensor]:
    ids = probe(base)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _head(task) -> torch.nn.Module:
    head = build_head("token_classification", task.tensors["head"]["classifier.weight"].shape[1], len(LABELS)).eval()
    head.load_state_dict(task.tensors["head"])
    return head


def test_fuse_and_average_validate_but_are_refused_before_anything_is_applied(modules, base):
    adapter, delta = method_combining("stack"), method_combining("sum")
    lang, domain = (ModuleRef.of(modules[adapter, r]) for r in ("lang", "domain"))
    task = ModuleRef.of(modules[adapter, "task"])
    before, tied = snapshot(base.model), is_tied(base.model)
    for composition, name in ((Composition(Stack(Fuse(lang, domain), task), base.fingerprint), "fuse"),
                              (Composition(Average(ModuleRef.of(modules[delta, "lang"]), lang), base.fingerprint),
                               "average")):
        with pytest.raises(XlpeftError) as err:
            activate(base, composition)
        assert f"{name} blocks are validated but not executed" in str(err.value)
        assert_restored(base.model, before, tied)
        with pytest.raises(XlpeftError, match=name):
            compose(base, composition)


def _three(modules, method: str) -> list:
    return [modules[method, role] for role in ("lang", "domain", "task")]


def test_three_adapters_stack_like_the_modules_applied_by_hand(modules, base, tmp_path):
    method = method_combining("stack")
    lang, domain, task = _three(modules, method)
    composition = Composition.of([ModuleRef.of(m) for m in (lang, domain, task)], base.fingerprint)
    assert composition.describe() == f"stack(language:sw/{method}, language:legal/{method}, task:ner/{method})"
    model = compose(base, composition)
    batch = _batch(base)
    with torch.no_grad():
        got = model(**batch).logits
    before, tied = snapshot(base.model), is_tied(base.model)
    handles = [get_method(method).apply(base, m) for m in (lang, domain, task)]  # by hand, bottom first
    base.model.eval()
    with torch.no_grad():
        expected = _head(task)(base.encoder(**batch).last_hidden_state)
    for h in handles:
        h.remove()
    assert_restored(base.model, before, tied)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    two = compose(base, [lang, task])
    with torch.no_grad():
        assert not torch.allclose(two(**batch).logits, got, atol=1e-4), "the domain module takes part"
    reloaded = load_composed(save_composed(model, tmp_path / "three", base.tokenizer))
    assert reloaded.xlpeft_composition == composition and len(reloaded.xlpeft_modules) == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, got, rtol=0, atol=1e-6)


def test_three_deltas_sum_into_the_weights(modules, base, tmp_path):
    method = method_combining("sum")
    three = _three(modules, method)
    composition = Composition(Sum(*(ModuleRef.of(m) for m in three)), base.fingerprint)
    model = compose(base, composition)
    manual = {k: v.clone() for k, v in base.encoder.state_dict().items()}
    prefix = base.arch.encoder + "."
    for module in three:  # theta0 + delta_lang + delta_domain + delta_task, by hand
        for name, (idx, vals) in SparseDelta.from_tensors(module.tensors["delta"]).entries.items():
            if name.startswith(prefix):
                manual[name.removeprefix(prefix)].view(-1).index_add_(0, idx, vals)
    composed = model.get_submodule(base.arch.encoder).state_dict()
    for key, value in manual.items():
        torch.testing.assert_close(composed[key], value, rtol=0, atol=1e-6, msg=key)
    batch = _batch(base)
    with torch.no_grad():
        got = model(**batch).logits
    encoder = base.encoder
    encoder.load_state_dict(manual)
    with torch.no_grad():
        expected = _head(three[2])(encoder(**batch).last_hidden_state)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    out = save_composed(model, tmp_path / "sum3", base.tokenizer)
    assert json.loads((out / COMPOSITION_FILE).read_text())["unmerged"] == {}
    with torch.no_grad():
        torch.testing.assert_close(load_composed(out)(**batch).logits, got, rtol=0, atol=1e-6)


def far_from_identity(module, seed: int):
    """A copy of an adapter module whose invertible adapter is random (so the order of two of them matters)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * 0.3 if k.startswith("invertible.") else v
             for k, v in module.tensors["adapter"].items()}
    return dataclasses.replace(module, tensors={**module.tensors, "adapter": state})


def test_two_language_adapters_on_an_mlm_invert_in_reverse_order(modules, base):
    """Embeddings see f_lang then f_domain; the decoder must see f_lang^-1(f_domain^-1(h)), exactly undoing both."""
    method = method_combining("stack")
    lang, domain = (far_from_identity(modules[method, role], seed) for seed, role in enumerate(("lang", "domain")))
    assert any(k.startswith("invertible.") for k in lang.tensors["adapter"])
    active = activate(base, [lang, domain])
    base.model.eval()
    embeddings, decoder = base.model.get_submodule(base.arch.embeddings), base.model.get_output_embeddings()
    ids = probe(base)
    with torch.no_grad():
        raw, hooked = embeddings.forward(input_ids=ids), embeddings(input_ids=ids)  # forward(): without hooks
        assert (hooked - raw).abs().max() > 0.1
        torch.testing.assert_close(decoder(hooked), decoder.forward(raw), rtol=0, atol=1e-5)
    active.remove()


def test_a_format_1_record_still_loads(modules, base, tmp_path):
    """xlpeft 0.1 wrote ``{"composition": {base_fingerprint, slots}, "adapters": ["adapters/<slot>"], "format_version": 1}``."""
    adapter, delta = method_combining("stack"), method_combining("sum")
    lang, task = modules[delta, "lang"], modules[adapter, "task"]  # a hybrid: the delta merged, the adapter beside it
    model = compose(base, [lang, task])
    out = save_composed(model, tmp_path / "v1", base.tokenizer)
    record = json.loads((out / COMPOSITION_FILE).read_text())
    assert record["unmerged"] == {"1": "modules/1"}
    (out / "adapters").mkdir()
    shutil.move(out / "modules/1", out / "adapters/1")
    (out / "modules").rmdir()
    slots = [{"kind": leaf.kind, "method": leaf.method, "name": leaf.name, "source": leaf.source,
              "combine": get_method(leaf.method).combine} for leaf in model.xlpeft_composition.leaves()]
    old = {"composition": {"base_fingerprint": base.fingerprint, "slots": slots}, "adapters": ["adapters/1"],
           "format_version": 1}
    (out / COMPOSITION_FILE).write_text(json.dumps(old, indent=2), encoding="utf-8")
    loaded = compose(out, [])
    assert loaded.xlpeft_composition.describe() == f"stack(language:sw/{delta}, task:ner/{adapter})"
    batch = _batch(base)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
    (out / COMPOSITION_FILE).write_text(json.dumps({**old, "format_version": 7}), encoding="utf-8")
    with pytest.raises(XlpeftError, match="format version 7"):
        load_composed(out)
