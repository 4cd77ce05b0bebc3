"""The in-place evaluation matrix (issue 20) scores exactly what composing every cell afresh scores.

Today's per-cell path, ``evaluate_model(compose(base, [lang, task]), ...)``, is kept in the library
and is the reference: the in-place path (:class:`~xlpeft.matrix.Scorer`, one model per task head,
modules swapped in place, each language encoded once) must give equal scores for a matrix mixing
adapter, sft and lora modules, bit-equal logits on a batch, and leave the bare base behind.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_ner
from tests.methods.fused_inputs import needed_settings
from xlpeft import evaluation
from xlpeft.compose import compose
from xlpeft.composed import InPlace
from xlpeft.data.mlm import mask_tokens
from xlpeft.data.tasks import TokenExample
from xlpeft.evaluation import evaluate_model
from xlpeft.io import Manifest, load_module, save_module
from xlpeft.matrix import BASELINE, Scorer, matrix_row
from xlpeft.methods.heads import build_head
from xlpeft.metrics import METRICS
from xlpeft.models import load_base
from xlpeft.packs import load_task_pack
from xlpeft.recipes.common import resolve_configs, resolve_epochs
from xlpeft.registry import get_method, method_names
from xlpeft.seeds import SeedGroup, seed_matrix
from xlpeft.training import mlm_loss, train_loop

LANG_METHODS = ("adapter", "sft", "lora")
TASK_METHODS = ("adapter", "lora")
TARGETS = ("sw", "yo")
TRAIN = {"max_steps": 3, "lr": 1e-2, "warmup_ratio": 0.0, "batch_size": 4, "max_seq_len": 16, "log_every": 1}
SMALL = {"sft": {"num_params": 300}, "compacter": {"reduction_factor": 4}}  # as tests/methods/test_contract.py


def train_module(base, pack, method: str, kind: str, name: str, out, seed: int, extra: dict | None = None):
    """A module trained a few steps on random ids through the method protocol (values away from the identity)."""
    cfg, train_cfg = resolve_configs(method, kind, {**TRAIN, **SMALL.get(method, {}), **needed_settings(method, base)})
    cfg = resolve_epochs(method, cfg, train_cfg, 64)
    torch.manual_seed(seed)
    trainable = get_method(method).prepare(base, cfg, train_cfg)
    head = build_head(pack.head, base.hidden_size, len(pack.labels), dropout=0.0) if kind == "task" else None
    gen = torch.Generator().manual_seed(seed)
    batches = iter(lambda: torch.randint(5, len(base.tokenizer), (4, 16), generator=gen), None)

    def loss(ids):
        if kind == "language":
            return mlm_loss(base, *mask_tokens(ids, base.tokenizer, 0.3, gen))
        logits = head(base.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), (ids % len(pack.labels)).reshape(-1))

    base.model.train()
    try:
        for phase in trainable.phases:
            params = trainable.begin_phase(phase) + (list(head.parameters()) if head is not None else [])
            train_loop(params, batches, loss, train_cfg, phase.steps, lambda *a: None,
                       after_step=lambda step, p=phase: trainable.after_step(p, step), progress=False)
            trainable.end_phase(phase)
        tensors, more = trainable.export()
    finally:
        trainable.close()
        base.model.eval()
    more = {k: v for k, v in more.items() if k != "trainable_parameters"} | (extra or {})
    if head is not None:
        tensors["head"] = head.state_dict()
        more.update(labels=list(pack.labels), head=pack.head)
    manifest = Manifest(kind=kind, method=method, config=dataclasses.asdict(cfg), extra=more,
                        base={"name": base.name, "fingerprint": base.fingerprint,
                              "model_type": base.model.config.model_type},
                        lang=name if kind == "language" else None, task=name if kind == "task" else None,
                        training={"seed": 0})
    return load_module(save_module(out, manifest, tensors))


def sentences(n: int, seed: int) -> list[TokenExample]:
    """NER sentences of the tests' template, with lengths from 3 to 13 words so batches pad."""
    rng = random.Random(seed)
    out = []
    for sent in make_ner(n, seed):
        sent = sent + [("na", "O")] * rng.randint(0, 6)
        out.append(TokenExample(tuple(w for w, _ in sent), tuple(t for _, t in sent)))
    return out


@pytest.fixture(scope="module", params=["tiny-bert", "tiny-xlmr"])
def matrix(request, base_dirs, tmp_path_factory):
    """(base, pack, examples by target, task modules, language modules by language, baseline stacks)."""
    root = tmp_path_factory.mktemp(f"matrix-{request.param}")
    base, pack = load_base(str(base_dirs[request.param])), load_task_pack("ner")
    lang_mods = {lang: {m: train_module(base, pack, m, "language", lang, root / f"{lang}-{m}", 10 * i + j)
                        for j, m in enumerate(LANG_METHODS)} for i, lang in enumerate(("en", *TARGETS))}
    task_mods = {m: train_module(base, pack, m, "task", "ner", root / f"ner-{m}", 100 + i,
                                 {"lang_module": {"path": str(lang_mods["en"][LANG_METHODS[i]].path)}})
                 for i, m in enumerate(TASK_METHODS)}
    references = {tm: [lang_mods["en"][LANG_METHODS[i]], task_mods[tm]] for i, tm in enumerate(TASK_METHODS)}
    examples = {lang: sentences(40, i) for i, lang in enumerate(TARGETS)}
    return base, pack, examples, task_mods, lang_mods, references


def per_cell_row(base, pack, examples, task_mods, lang_mods, references) -> dict[str, float]:
    """Today's path: a freshly composed model per cell, the examples encoded per cell."""
    key = METRICS[pack.metric]
    row = {}
    for tm, task_mod in task_mods.items():
        for lm, lang_mod in lang_mods.items():
            row[f"{lm}+{tm}"] = evaluate_model(compose(base, [lang_mod, task_mod]), pack, base.tokenizer, examples)[key]
        row[f"{BASELINE}+{tm}"] = evaluate_model(compose(base, references[tm]), pack, base.tokenizer, examples)[key]
    return row


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(remove_duplicate=False),
                                                  *model.named_buffers(remove_duplicate=False)]}


def test_in_place_matrix_equals_composing_every_cell(matrix):
    base, pack, examples, task_mods, lang_mods, references = matrix
    scorer = Scorer(base)
    for lang, ex in examples.items():
        expected = per_cell_row(base, pack, ex, task_mods, lang_mods[lang], references)
        got = matrix_row(scorer, scorer.prepare(pack, ex), task_mods, lang_mods[lang], references)
        assert list(got) == list(expected)  # same columns, same order
        assert got == expected, lang  # equal, not approximately
        assert len(set(got.values())) > 1, "the modules make a difference (else equality proves little)"
    scorer.close()


def test_logits_on_a_batch_are_bit_equal_in_any_order(matrix):
    """Every cell, visited so that lower modules are kept, swapped and models switched, against compose()."""
    base, pack, examples, task_mods, lang_mods, references = matrix
    data = Scorer(base).prepare(pack, examples["sw"])
    batch = data.batches[-1][1]  # the longest sentences, padded
    cells = [[lang_mods["sw"][lm], task_mods[tm]] for lm in LANG_METHODS for tm in TASK_METHODS]
    cells += list(references.values()) + [cells[0], cells[3], cells[0]]
    in_place = InPlace(base)
    for modules in cells:
        with torch.no_grad():
            expected = compose(base, modules)(**batch).logits
            with in_place.composed(modules) as model:
                got = model(**batch).logits
        assert torch.equal(got, expected), [m.manifest.method for m in modules]
    in_place.close()


def test_the_base_is_loaded_once_and_each_language_encoded_once(matrix, monkeypatch):
    """No model built, deep-copied or examples encoded per cell: one task model, one encoding per language."""
    import xlpeft.composed as composed

    base, pack, examples, task_mods, lang_mods, references = matrix
    built, encoded = [], []
    real_target, real_encode = composed.target_model, evaluation.encode
    monkeypatch.setattr(composed, "target_model", lambda *a, **k: built.append(1) or real_target(*a, **k))
    monkeypatch.setattr(evaluation, "encode", lambda *a, **k: encoded.append(1) or real_encode(*a, **k))
    scorer = Scorer(base)
    for lang, ex in examples.items():
        matrix_row(scorer, scorer.prepare(pack, ex), task_mods, lang_mods[lang], references)
    assert len(built) == 1 and len(encoded) == len(examples)
    scorer.close()


def test_close_and_errors_leave_the_bare_base(matrix):
    base, pack, examples, task_mods, lang_mods, references = matrix
    before = state(base.model)
    in_place = InPlace(base)
    modules = [lang_mods["sw"]["sft"], task_mods["lora"]]
    with in_place.composed(modules) as model:
        bare_encoder = state(base.encoder)
    with pytest.raises(RuntimeError, match="inside"):
        with in_place.composed([lang_mods["sw"]["adapter"], task_mods["adapter"]]):
            raise RuntimeError("inside the block")
    encoder = state(model.get_submodule(base.arch.encoder))
    assert all(torch.equal(encoder[k], v) for k, v in bare_encoder.items()), "an error removes every module"
    assert not model._forward_hooks and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with in_place.composed(modules):
        pass
    in_place.close()
    encoder = state(model.get_submodule(base.arch.encoder))
    assert all(torch.equal(encoder[k], v) for k, v in bare_encoder.items()), "close() restores the bare encoder"
    after = state(base.model)
    assert all(torch.equal(after[k], v) for k, v in before.items()), "the base itself is never changed"


def test_a_language_only_composition_is_refused_in_place(matrix):
    base, *_, lang_mods, _ = matrix
    with pytest.raises(Exception, match="needs a task module on top"):
        with InPlace(base).composed([lang_mods["sw"]["adapter"]]):
            pass


def test_seed_matrix_in_place_equals_composing_every_cell(matrix, tmp_path):
    """evaluate --modules-dir's matrix, with its in-language ceiling column, equals the per-cell path."""
    base, pack, examples, task_mods, lang_mods, references = matrix
    own = train_module(base, pack, "adapter", "task", "ner", tmp_path / "sw-task", 7,
                       {"lang_module": {"path": str(lang_mods["sw"]["adapter"].path)}})
    group = SeedGroup(0, {("sw", m): mod for m, mod in lang_mods["sw"].items()},
                      {**{("en", m): mod for m, mod in task_mods.items()}, ("sw", "adapter"): own})
    scorer = Scorer(base)
    got = seed_matrix(scorer, pack, group, "en", {"sw": scorer.prepare(pack, examples["sw"])})
    scorer.close()
    expected = per_cell_row(base, pack, examples["sw"], task_mods, lang_mods["sw"], references)
    expected["in-language+adapter"] = evaluate_model(compose(base, [lang_mods["sw"]["adapter"], own]), pack,
                                                     base.tokenizer, examples["sw"])[METRICS[pack.metric]]
    assert got.rows["sw"] == expected


@pytest.fixture(scope="module")
def every_method(base_dirs, tmp_path_factory):
    """``get(method, kind)``: a module of every registered method on tiny-bert, trained once (cached)."""
    root = tmp_path_factory.mktemp("every-method")
    base, pack, cache = load_base(str(base_dirs["tiny-bert"])), load_task_pack("ner"), {}

    def get(method: str, kind: str):
        if (method, kind) not in cache:
            name = "sw" if kind == "language" else "ner"
            cache[method, kind] = train_module(base, pack, method, kind, name, root / f"{kind}-{method}", len(cache))
        return cache[method, kind]

    return base, pack, get


@pytest.mark.parametrize("method", method_names())
def test_every_method_in_place_gives_composes_logits(every_method, method):
    """A method's module as the language module and as the task module: bit-equal logits to compose(), after a swap."""
    base, pack, get = every_method
    batch = Scorer(base).prepare(pack, sentences(12, 3)).batches[-1][1]
    in_place = InPlace(base)
    cells = [[get(method, "language"), get("adapter", "task")], [get("adapter", "language"), get(method, "task")],
             [get(method, "language"), get(method, "task")], [get(method, "language"), get("adapter", "task")]]
    for modules in cells:
        with torch.no_grad():
            expected = compose(base, modules)(**batch).logits
            with in_place.composed(modules) as model:
                got = model(**batch).logits
        assert torch.equal(got, expected), [m.manifest.method for m in modules]
    in_place.close()
