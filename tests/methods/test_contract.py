"""The method contract, one row per registered method (``method_names()``): a new method is new rows.

Each method is driven only through its :class:`~xlpeft.methods.base.MethodSpec` and the
``Trainable`` / ``Applied`` protocols, on the tiny in-process bases:

* an untrained module is the identity when its spec says so (``identity_at_init``: an adapter's
  up-projection and an SFT's delta start at zero), and changes the outputs when it says not;
* ``spec.apply`` then ``remove()`` restores every parameter and buffer bit-exactly, also removed
  out of order under another module;
* save/load (manifest + safetensors) gives the outputs the trained module had;
* ``resume_phase(state_dict())`` on a fresh base rebuilds the module where it was (the CLI-level
  resume and DDP equalities are ``tests/recipes/test_resume.py`` / ``test_distributed.py``);
* a language module of every method composes under a task module of every method, equal to the
  two applied by hand, and reloads equal from ``compose --output``'s directory;
* the spec is complete and consistent with what the method writes.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.methods.fused_inputs import needed_settings
from xlpeft.compose import Stack, Sum, activate, compose
from xlpeft.composed import load_composed, save_composed
from xlpeft.config import TrainConfig
from xlpeft.data.mlm import mask_tokens
from xlpeft.io import Manifest, load_module, save_module
from xlpeft.methods.base import COMBINES, MODULE_KINDS
from xlpeft.methods.heads import build_head
from xlpeft.models import load_base
from xlpeft.recipes.common import resolve_configs, resolve_epochs
from xlpeft.registry import get_method, method_names
from xlpeft.training import mlm_loss, train_loop

METHODS = method_names()
PAIRS = list(itertools.product(METHODS, METHODS))
ARCHS = ("tiny-bert", "tiny-xlmr")
LABELS = ["O", "B-X", "I-X"]
STEPS = 4
# Per-method settings that keep a tiny run tiny (LT-SFT's default K is larger than a tiny base); not the method list. Parallel's row also trains with AdapterDrop.
SMALL: dict[str, dict] = {"sft": {"num_params": 300}, "compacter": {"reduction_factor": 4}, "parallel": {"adapter_drop": 1}}
TRAIN = {"max_steps": STEPS, "lr": 1e-2, "warmup_ratio": 0.0, "batch_size": 4, "max_seq_len": 16, "log_every": 1}


def configs(method: str, kind: str, base=None, **train) -> tuple[object, TrainConfig]:
    """The method and training configs exactly as the recipes resolve them (explicit keys: ``TRAIN``), for 64 examples.

    ``base``: the base in use, for settings made on it (the modules a fusion fuses, :mod:`.fused_inputs`).
    """
    made = needed_settings(method, base) if base is not None else {}
    cfg, train_cfg = resolve_configs(method, kind, {**TRAIN, **train, **SMALL.get(method, {}), **made})
    return resolve_epochs(method, cfg, train_cfg, 64), train_cfg


def probe(base) -> torch.Tensor:
    ids = torch.randint(5, len(base.tokenizer), (2, 10), generator=torch.Generator().manual_seed(7))
    return ids


def outputs(base, ids: torch.Tensor) -> torch.Tensor:
    """The MLM logits of ``base.model`` in eval mode (B, T, V): every module of either kind shows up here."""
    was = base.model.training
    base.model.eval()
    with torch.no_grad():
        out = base.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    base.model.train(was)
    return out


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    state.update({f"b:{n}": b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)})
    return state


def assert_restored(model: torch.nn.Module, before: dict[str, torch.Tensor], tied: bool) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"not restored bit-exactly: {changed[:5]}"
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    assert (out is not None and out.weight is inp.weight) == tied, "the decoder tie is as it was"
    assert not any(p.requires_grad for p in model.parameters()), "the base stays frozen"


def is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


class Batches:
    """Endless random id batches (B, T) from a seeded generator."""

    def __init__(self, base, seed: int) -> None:
        self.vocab, self.gen = len(base.tokenizer), torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return torch.randint(5, self.vocab, (TRAIN["batch_size"], TRAIN["max_seq_len"]), generator=self.gen)


def make_loss(base, kind: str, head, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "language":
        def loss(ids):
            inputs, labels = mask_tokens(ids, base.tokenizer, 0.3, gen)
            return mlm_loss(base, inputs, labels)
        return loss

    def loss(ids):
        hidden = base.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        labels = ids % len(LABELS)  # a learnable labelling: the head and module both get gradients
        logits = head(hidden)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return loss


def run_phases(base, trainable, train_cfg: TrainConfig, kind: str, head, seed: int, stop_after: int | None = None):
    """Every phase through the protocol, as the recipes' loop runs them.

    ``stop_after``: stop inside the phase where that many steps in all are done (it is not ended) and return it.
    """
    initial = {k: v.clone() for k, v in head.state_dict().items()} if head is not None else None
    data, loss = Batches(base, seed), make_loss(base, kind, head, seed)
    done = 0
    base.model.train()
    for phase in trainable.phases:
        if phase.reset_extras and head is not None:
            head.load_state_dict(initial)
        params = trainable.begin_phase(phase) + (list(head.parameters()) if head is not None else [])
        steps = phase.steps if stop_after is None else min(phase.steps, stop_after - done)
        train_loop(params, data, loss, train_cfg, steps, lambda *a: None,
                   after_step=lambda step, p=phase: trainable.after_step(p, step), progress=False)
        done += steps
        if stop_after is not None and done >= stop_after:
            return phase
        trainable.end_phase(phase)
    return None


def prepare(base, method: str, kind: str, seed: int = 0):
    cfg, train_cfg = configs(method, kind, base)
    torch.manual_seed(seed)
    trainable = get_method(method).prepare(base, cfg, train_cfg)
    head = build_head("token_classification", base.hidden_size, len(LABELS), dropout=0.0) if kind == "task" else None
    return trainable, head, cfg, train_cfg


def save(base, method: str, kind: str, cfg, tensors: dict, extra: dict, head, out_dir: Path,
         name: str | None = None) -> Path:
    """Write a module directory as the recipes do (a task module carries its head and labels)."""
    tensors, extra = dict(tensors), {k: v for k, v in extra.items() if k != "trainable_parameters"}
    if head is not None:
        tensors["head"] = head.state_dict()
        extra.update(labels=LABELS, head="token_classification")
    label = name or ("sw" if kind == "language" else "ner")
    manifest = Manifest(kind=kind, method=method, config=asdict(cfg),
                        base={"name": base.name, "fingerprint": base.fingerprint,
                              "model_type": base.model.config.model_type},
                        lang=label if kind == "language" else None, task=label if kind == "task" else None,
                        trainable_parameters=sum(t.numel() for s in tensors.values() for t in s.values()), extra=extra)
    return save_module(out_dir, manifest, tensors)


def train_and_save(base, method: str, kind: str, out_dir: Path, seed: int = 0, name: str | None = None):
    """Train a module through the protocol and save it; returns (path, outputs when trained, stems export() wrote)."""
    trainable, head, cfg, train_cfg = prepare(base, method, kind, seed)
    try:
        run_phases(base, trainable, train_cfg, kind, head, seed)
        trained = outputs(base, probe(base))
        tensors, extra = trainable.export()
    finally:
        trainable.close()
    return save(base, method, kind, cfg, tensors, extra, head, out_dir, name), trained, set(tensors)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_dirs):
    """``trained(arch, method, kind, seed=0)`` -> (module path, outputs when trained, exported stems); cached."""
    root = tmp_path_factory.mktemp("contract")
    cache: dict[tuple, tuple] = {}

    def get(arch: str, method: str, kind: str, seed: int = 0):
        key = (arch, method, kind, seed)
        if key not in cache:
            base = load_base(str(base_dirs[arch]))
            cache[key] = train_and_save(base, method, kind, root / "-".join(map(str, key)), seed)
        return cache[key]

    return get


@pytest.fixture
def fresh(base_dirs):
    return lambda arch="tiny-bert": load_base(str(base_dirs[arch]))


# ---- the contract

@pytest.mark.parametrize("kind", MODULE_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_untrained_module_is_the_identity(fresh, tmp_path, method, kind):
    """Prepared, every phase entered and ended without a step (0 effective change), exported: the bare base's outputs."""
    base = fresh()
    ids, before, tied = probe(base), snapshot(base.model), is_tied(base.model)
    ref = outputs(base, ids)
    identity = get_method(method).identity_at_init
    trainable, head, cfg, _ = prepare(base, method, kind)
    try:
        untrained = outputs(base, ids)
        assert torch.equal(untrained, ref) == identity, f"prepared: identity_at_init={identity} says so"
        for phase in trainable.phases:
            trainable.begin_phase(phase)
            assert torch.equal(outputs(base, ids), untrained), f"in phase {phase.name}"
            trainable.end_phase(phase)
        tensors, extra = trainable.export()
    finally:
        trainable.close()
    assert_restored(base.model, before, tied)
    module = load_module(save(base, method, kind, cfg, tensors, extra, head, tmp_path / "untrained"))
    other = fresh()
    handle = get_method(method).apply(other, module)
    torch.testing.assert_close(outputs(other, ids), untrained, rtol=0, atol=1e-6,
                               msg="the untrained module, saved and applied, gives what it gave when prepared")
    handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_apply_then_remove_restores_the_base_bit_exactly(trained, fresh, arch, method):
    base = fresh(arch)
    ids, before, tied = probe(base), snapshot(base.model), is_tied(base.model)
    ref = outputs(base, ids)
    handle = get_method(method).apply(base, load_module(trained(arch, method, "language")[0]))
    assert not torch.allclose(outputs(base, ids), ref, atol=1e-4), "the trained module changes the outputs"
    assert all(not p.requires_grad for m in handle.modules() for p in m.parameters()), "applied modules are frozen"
    handle.remove()
    assert_restored(base.model, before, tied)
    handle.remove()  # safe twice
    assert_restored(base.model, before, tied)


@pytest.mark.parametrize("lower, upper", PAIRS)
def test_removed_out_of_order_leaves_what_the_other_alone_gives(trained, fresh, lower, upper):
    """Remove the lower module first, with another one applied above it: then the upper one, bit-exact."""
    base = fresh()
    ids, before, tied = probe(base), snapshot(base.model), is_tied(base.model)
    lang = load_module(trained("tiny-bert", lower, "language")[0])
    task = load_module(trained("tiny-bert", upper, "task")[0])
    alone = fresh()
    only_upper = get_method(upper).apply(alone, task)
    expected = outputs(alone, ids)
    only_upper.remove()
    below = get_method(lower).apply(base, lang)
    above = get_method(upper).apply(base, task)
    below.remove()
    torch.testing.assert_close(outputs(base, ids), expected, rtol=0, atol=1e-6)
    above.remove()
    assert_restored(base.model, before, tied)


@pytest.mark.parametrize("kind", MODULE_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_gives_the_trained_outputs(trained, fresh, tmp_path, method, kind):
    from xlpeft.config import build

    path, when_trained, _ = trained("tiny-bert", method, kind)
    module = load_module(path)
    spec = get_method(method)
    assert (module.manifest.kind, module.manifest.method) == (kind, method)
    base = fresh()
    assert build(spec.config_cls, module.manifest.config) == configs(method, kind, base)[0], "the config round-trips"
    handle = spec.apply(base, module)
    torch.testing.assert_close(outputs(base, probe(base)), when_trained, rtol=0, atol=1e-6)
    handle.remove()
    again = load_module(save_module(tmp_path / "again", module.manifest, module.tensors))
    assert again.manifest == dataclasses.replace(module.manifest, created=again.manifest.created)
    for stem, state in module.tensors.items():
        assert state.keys() == again.tensors[stem].keys()
        assert all(torch.equal(t, again.tensors[stem][k]) for k, t in state.items()), stem


@pytest.mark.parametrize("kind", MODULE_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_resume_phase_rebuilds_the_module_where_state_dict_left_it(fresh, method, kind):
    """A checkpoint's trainable state, loaded into a differently initialised trainable on a fresh base."""
    phases = prepare(fresh(), method, kind)[0].phases
    for stop in sorted({1, sum(p.steps for p in phases) - 1}):  # inside the first and inside the last phase
        base = fresh()
        ids = probe(base)
        trainable, head, _, train_cfg = prepare(base, method, kind)
        phase = run_phases(base, trainable, train_cfg, kind, head, seed=0, stop_after=stop)
        state = {k: v.clone() for k, v in trainable.state_dict().items()}
        expected = outputs(base, ids)
        trainable.close()
        other = fresh()
        before, tied = snapshot(other.model), is_tied(other.model)
        resumed = prepare(other, method, kind, seed=1)[0]
        params = resumed.resume_phase(phase, state)
        assert params and all(p.requires_grad for p in params), f"{phase.name}: parameters to optimise"
        torch.testing.assert_close(outputs(other, ids), expected, rtol=0, atol=1e-6, msg=f"resumed in {phase.name}")
        resumed.close()
        assert_restored(other.model, before, tied)


@pytest.mark.parametrize("lower, upper", PAIRS)
def test_every_method_composes_under_every_method(trained, fresh, tmp_path, lower, upper):
    """Composed, equal to both modules applied by hand, and the same again after ``compose --output``'s save and reload."""
    base = fresh()
    before, tied = snapshot(base.model), is_tied(base.model)
    lang = load_module(trained("tiny-bert", lower, "language")[0])
    task = load_module(trained("tiny-bert", upper, "task")[0])
    model = compose(base, [lang, task])
    composition = model.xlpeft_composition
    both_sum = all(get_method(m).combine == "sum" for m in (lower, upper))
    assert type(composition.root) is (Sum if both_sum else Stack), composition.describe()
    assert [leaf.method for leaf in composition.leaves()] == [lower, upper]
    ids = probe(base)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        got = model(**batch).logits
    assert got.shape == (2, 10, len(LABELS)) and bool(torch.isfinite(got).all())
    assert_restored(base.model, before, tied)  # composing builds its own model: the base is untouched
    # the same by hand: both modules activated on the base, the task head on the encoder's output
    active = activate(base, [lang, task])
    head = build_head("token_classification", base.hidden_size, len(LABELS)).eval()
    head.load_state_dict(task.tensors["head"])
    base.model.eval()
    with torch.no_grad():
        expected = head(base.encoder(**batch).last_hidden_state)
    active.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_restored(base.model, before, tied)
    reloaded = load_composed(save_composed(model, tmp_path / "composed", base.tokenizer)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, got, rtol=1e-5, atol=1e-5, msg="saved and reloaded")
    model.xlpeft_active.remove()  # the composed model's encoder is the bare base's again
    encoder = model.get_submodule(base.arch.encoder).state_dict()
    assert all(torch.equal(encoder[k], v) for k, v in base.encoder.state_dict().items())


@pytest.mark.parametrize("method", METHODS)
def test_check_leaves_the_base_and_the_random_stream_alone(fresh, method):
    """``spec.check`` (run by the recipes before a run opens) on a valid config: no error, base bit-exact, same draws."""
    base = fresh()
    before, tied = snapshot(base.model), is_tied(base.model)
    for kind in MODULE_KINDS:
        cfg, train_cfg = configs(method, kind, base)
        torch.manual_seed(3)
        get_method(method).check(base, cfg, train_cfg)
        drawn = torch.rand(4)
        torch.manual_seed(3)
        assert torch.equal(drawn, torch.rand(4)), "the dry run drew from the caller's random stream"
        assert_restored(base.model, before, tied)


@pytest.mark.parametrize("method", METHODS)
def test_the_spec_is_complete(trained, method):
    spec = get_method(method)
    assert spec.name == method and spec.help and spec.combine in COMBINES
    assert callable(spec.prepare) and callable(spec.apply) and callable(spec.plan)
    cls = spec.config_cls
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, "a frozen config dataclass"
    names = {f.name for f in fields(cls)}
    assert all(f.metadata.get("help") for f in fields(cls)), "every --set key has help"
    train_names = {f.name for f in fields(TrainConfig)}
    for kind in MODULE_KINDS:
        assert set(spec.defaults(kind)) <= names, f"{kind} defaults name config fields"
        assert set(spec.train_defaults(kind)) <= train_names, f"{kind} training defaults name TrainConfig fields"
        cls(**spec.defaults(kind))  # the published recipe's config is valid as such
        assert spec.kind_defaults(kind) == {**spec.defaults(kind), **spec.train_defaults(kind)}
    for key, dropped in spec.dropped_by.items():
        assert key in train_names and set(dropped) <= names, (key, dropped)
    assert spec.files, "files names the tensor files a module holds"
    for kind in MODULE_KINDS:
        path, _, exported = trained("tiny-bert", method, kind)
        assert exported == set(spec.files), f"{kind}: export() wrote {sorted(exported)}"
        assert set(spec.files) <= {f.removesuffix(".safetensors") for f in load_module(path).manifest.files}
    if spec.overlap is not None:
        lang = load_module(trained("tiny-bert", method, "language")[0])
        task = load_module(trained("tiny-bert", method, "task")[0])
        counts = spec.overlap(lang, task)
        assert all(isinstance(v, int) and v >= 0 for v in counts.values()), counts
        assert sum(spec.overlap(lang, lang).values()) > 0, "a module overlaps itself"


@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).weight_delta is not None])
def test_weight_delta_is_what_applying_the_module_adds_to_the_weights(trained, fresh, method):
    """``MethodSpec.weight_delta`` (what ``xlpeft merge`` merges) equals the applied module's change to θ0."""
    base = fresh()
    module = load_module(trained("tiny-bert", method, "language")[0])
    entries = get_method(method).weight_delta(base, module)
    before = snapshot(base.model)
    handle = get_method(method).apply(base, module)
    after = snapshot(base.model)
    handle.remove()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= {f"p:{name}" for name in entries}, "every weight the module changes is in its delta"
    for name, (idx, vals) in entries.items():
        w0 = before[f"p:{name}"]
        expected = w0.clone().view(-1).index_add_(0, idx, vals.to(w0.dtype)).view_as(w0)
        torch.testing.assert_close(after[f"p:{name}"], expected, rtol=0, atol=1e-6)
    if get_method(method).merge_own is not None:
        merged = get_method(method).merge_own([module, module], [0.5, 0.5], 1.0)
        assert merged is not None, "a module merges with itself"
