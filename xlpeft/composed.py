"""Composed models as Hugging Face models, and their directories: the checkpoint plus what it cannot hold.

:func:`target_model` builds the model a composition runs in (MLM, or token/sequence
classification with the task module's head). :func:`save_composed` writes it so that
``from_pretrained`` loads the merged weights (deltas are already in them) and :func:`load_composed`
re-applies what a checkpoint cannot hold (hooked modules such as adapters, each method saying
what through ``Applied.saved_tensors``), reading the composition record with a checked version.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from xlpeft.compose import Active, Composition, ModuleRef, check_same_base
from xlpeft.errors import XlpeftError
from xlpeft.io import LoadedModule, load_module
from xlpeft.methods.adapterdrop import set_inference_drop
from xlpeft.methods.base import Applied
from xlpeft.registry import get_method
from xlpeft.vocab import STEM as VOCAB_STEM
from xlpeft.vocab import MergedAlready, composition_vocab, with_vocab

COMPOSITION_FILE = "xlpeft_composition.json"
UNMERGED_DIR = "modules"  # modules/<leaf index>: the modules a checkpoint cannot hold, as xlpeft module folders


def target_model(base, task: LoadedModule | None) -> nn.Module:
    """A fresh Hugging Face model for the composition: MLM, or token/sequence classification with the task head."""
    if task is None:
        return copy.deepcopy(base.model)
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    check_head(task, base.hidden_size)  # before reading the labels: an incomplete module is one clear error
    labels = task.manifest.extra["labels"]
    head_kind = task.manifest.extra["head"]
    config = copy.deepcopy(base.model.config)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    auto = AutoModelForTokenClassification if head_kind == "token_classification" else AutoModelForSequenceClassification
    model = auto.from_config(config)
    encoder = model.get_submodule(base.arch.encoder)
    missing, unexpected = encoder.load_state_dict(base.encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise XlpeftError(f"base encoder does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    load_head(model, base, task)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(next(base.model.parameters()).device)


@torch.no_grad()
def load_head(model: nn.Module, base, task: LoadedModule) -> None:
    """Copy the task module's head (checked by :func:`check_head`) into a :func:`target_model`'s head layers."""
    head = task.tensors["head"]
    if task.manifest.extra["head"] == "token_classification":
        _copy_linear(model.get_submodule(base.arch.token_head), head, "classifier")
    else:
        dense, out = base.arch.seq_head
        _copy_linear(model.get_submodule(dense), head, "dense")
        _copy_linear(model.get_submodule(out), head, "classifier")


class InPlace:
    """Compositions with a task module on one base, one after another, in place: nothing rebuilt per composition.

    :func:`~xlpeft.compose.compose` builds a fresh model per composition (a Hugging Face model from
    its config, the base encoder's weights copied in, every module applied). Here the model of a
    task head (its kind and labels) is built once; each composition copies its task module's head
    into it and changes only the modules that differ from the previous composition's: those above
    the longest shared bottom are removed, bit-exactly (``Applied.remove``), and the new ones applied
    in order, as :func:`~xlpeft.compose.activate` would. So ``[sw, task_a]`` then ``[sw, task_b]``
    applies ``sw`` once. Outputs equal ``compose``'s. :meth:`close` restores the bare model.
    """

    def __init__(self, base, force: bool = False) -> None:
        self.base, self.force = base, force
        self._models: dict[tuple[str, tuple[str, ...]], nn.Module] = {}
        self._model: nn.Module | None = None  # the model holding ``_applied``
        self._applied: list[tuple[LoadedModule, Applied]] = []  # bottom first

    def model_for(self, task: LoadedModule) -> nn.Module:
        """The model of ``task``'s head kind and labels (built on first use), holding ``task``'s head."""
        check_head(task, self.base.hidden_size)
        key = (task.manifest.extra["head"], tuple(task.manifest.extra["labels"]))
        if key not in self._models:
            self._models[key] = target_model(self.base, task).eval()
        model = self._models[key]
        load_head(model, self.base, task)
        return model

    @contextmanager
    def composed(self, modules: Sequence[LoadedModule]) -> Iterator[nn.Module]:
        """The model with ``modules`` (bottom first, the task module last) applied, in eval mode.

        The modules stay applied after the block, for the next composition to keep what it shares;
        an error inside the block (or while applying) removes them all.

        Raises:
            XlpeftError: no task module on top (an MLM composition: use ``compose``), a module trained on
                another base (unless ``force``), or a module that does not fit.
        """
        composition = Composition.of([ModuleRef.of(m) for m in modules], self.base.fingerprint)  # validated
        if composition_vocab(modules) is not None:
            raise XlpeftError(f"{composition.describe()}: a language module that adds new vocabulary is not scored in "
                              "place (the examples are encoded once, with the base's tokenizer); score it with "
                              "xlpeft compose --lang ... --task ... or xlpeft.compose")
        if composition.task is None:
            raise XlpeftError(f"{composition.describe()}: evaluating in place needs a task module on top; use compose()")
        if not self.force:
            check_same_base(self.base, modules)
        try:
            model = self.model_for(composition.task.module)
            self._align(model, list(modules))
            yield model
        except BaseException:
            self.close()
            raise

    def _align(self, model: nn.Module, modules: list[LoadedModule]) -> None:
        """Apply ``modules`` on ``model``, keeping the applied bottom they share (same objects, same order)."""
        if model is not self._model:
            self.close()
            self._model = model
        keep = 0
        while keep < min(len(self._applied), len(modules)) and self._applied[keep][0] is modules[keep]:
            keep += 1
        while len(self._applied) > keep:
            self._applied.pop()[1].remove()  # newest first: a plain restore
        base = dataclasses.replace(self.base, model=model)
        for module in modules[keep:]:
            self._applied.append((module, get_method(module.manifest.method).apply(base, module)))
        hooked = [m for _, handle in self._applied for m in handle.modules()]
        set_inference_drop(hooked, 0, len(base.layers))  # as activate() with the composition's adapter_drop, 0
        for m in hooked:
            m.eval()  # as compose's model.eval() leaves the modules it owns

    def close(self) -> None:
        """Remove every applied module, newest first: each model is the bare base with a head again."""
        while self._applied:
            self._applied.pop()[1].remove()
        self._model = None


def check_head(task: LoadedModule, hidden_size: int) -> None:
    """The saved head must fit the base's hidden size and the module's label list."""
    from xlpeft.methods.heads import build_head

    extra = task.manifest.extra
    if "head" not in task.tensors or "labels" not in extra or "head" not in extra:
        raise XlpeftError(f"task module {task.path} has no head (head.safetensors and labels); it is incomplete")
    expected = build_head(extra["head"], hidden_size, len(extra["labels"])).state_dict()
    got = task.tensors["head"]
    problems = [f"{k}: expected {tuple(v.shape)}, got {tuple(got[k].shape) if k in got else 'nothing'}"
                for k, v in expected.items() if k not in got or got[k].shape != v.shape]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    if problems:
        raise XlpeftError(f"task head in {task.path} does not fit a base of hidden size {hidden_size} with "
                          f"{len(extra['labels'])} labels: {'; '.join(problems)}")


def _copy_linear(target: nn.Linear, state: dict[str, torch.Tensor], prefix: str) -> None:
    target.weight.copy_(state[f"{prefix}.weight"])
    target.bias.copy_(state[f"{prefix}.bias"])


def save_composed(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a composed model so that :func:`~xlpeft.compose.compose` (or ``from_pretrained``) loads it back.

    Merged modules (deltas) are in the weights, so with no hooked module the directory is a plain
    transformers checkpoint. Hooked modules (adapters) are written next to it as xlpeft module
    folders (``modules/<i>``, ``i`` the module's position in the composition) and re-applied by
    :func:`load_composed`; ``from_pretrained`` alone gives the model *without* them.
    """
    from xlpeft.io import save_module

    if tokenizer is not None and len(tokenizer) != len(model.xlpeft_tokenizer or tokenizer):
        raise XlpeftError("save_composed: pass the composed model's own tokenizer (model.xlpeft_tokenizer): its "
                          "language module adds words the given tokenizer does not have")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    own = model._modules.pop("xlpeft_modules", None)
    try:
        model.save_pretrained(out_dir)
    finally:
        if own is not None:
            model.add_module("xlpeft_modules", own)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    composition: Composition = model.xlpeft_composition
    active: Active = model.xlpeft_active
    unmerged = {}
    for i, leaf, handle in active.entries:
        tensors = handle.saved_tensors()
        if tensors:
            sub = f"{UNMERGED_DIR}/{i}"
            save_module(out_dir / sub, leaf.module.manifest, tensors)
            unmerged[str(i)] = sub
    record = {**composition.to_dict(), "unmerged": unmerged}
    (out_dir / COMPOSITION_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out_dir


def read_record(path: Path) -> tuple[Composition, dict[int, Path]]:
    """The composition and its unmerged module folders (by leaf index) from a composed model's directory."""
    try:
        record = json.loads((path / COMPOSITION_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XlpeftError(f"cannot read {path / COMPOSITION_FILE} ({exc}); it is not a composed model written by "
                          "xlpeft: compose it again") from None
    if record.get("format_version") == 1:  # xlpeft 0.1: {"composition": {slots}, "adapters": ["adapters/<slot>"]}
        composition = Composition.from_dict({**record["composition"], "format_version": 1})
        return composition, {int(sub.rsplit("/", 1)[1]): path / sub for sub in record.get("adapters", [])}
    composition = Composition.from_dict(record)
    return composition, {int(i): path / sub for i, sub in record.get("unmerged", {}).items()}


def _saved_tokenizer(path: Path):
    """The tokenizer :func:`save_composed` wrote beside the checkpoint, or None when it was given none."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None


def load_composed(path: str | Path) -> nn.Module:
    """Load a directory written by :func:`save_composed`: the checkpoint, then its unmerged modules re-applied."""
    from transformers import (
        AutoConfig,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    from xlpeft.models import Base, arch_for

    path = Path(path)
    composition, unmerged = read_record(path)
    arch_name = (AutoConfig.from_pretrained(path).architectures or [""])[0]
    auto = (AutoModelForTokenClassification if arch_name.endswith("ForTokenClassification")
            else AutoModelForSequenceClassification if arch_name.endswith("ForSequenceClassification")
            else AutoModelForMaskedLM)
    model = auto.from_pretrained(path)
    for p in model.parameters():
        p.requires_grad_(False)
    base = Base(name=str(path), path=path, model=model, tokenizer=None, fingerprint=composition.base_fingerprint,
                arch=arch_for(model))
    active = Active(composition)
    leaves = composition.leaves()
    try:
        for i, sub in sorted(unmerged.items()):
            module = load_module(sub)
            if i >= len(leaves) or module.manifest.method != leaves[i].method:
                raise XlpeftError(f"{sub} does not match module {i} of the composition record in {path}; the "
                                  "directory was edited by hand: compose it again")
            leaf = dataclasses.replace(leaves[i], module=module)
            own = {stem: state for stem, state in module.tensors.items() if stem != VOCAB_STEM}  # the method's
            handle = (get_method(leaf.method).apply(base, dataclasses.replace(module, tensors=own)) if own
                      else MergedAlready())  # a delta with new words: the delta is in the weights, the rows are not
            active.entries.append((i, leaf, with_vocab(model, module, handle)))
        set_inference_drop(active.modules(), composition.adapter_drop, len(base.layers))  # as it was composed
    except BaseException:
        active.remove()
        raise
    model.add_module("xlpeft_modules", nn.ModuleList(active.modules()))
    model.xlpeft_composition = composition
    model.xlpeft_active = active
    model.xlpeft_tokenizer = _saved_tokenizer(path)  # with the language module's new words, as it was saved
    return model.eval()
