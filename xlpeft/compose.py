"""Compositions as data: which modules, in which order, combined how; :func:`activate` executes one.

A composition is a tree of blocks over module references, built and validated *before* anything
is applied (as AdapterHub's ``composition.py``, Pfeiffer et al. 2020):

* :class:`Stack` — children act in turn on the hidden states, bottom first (MAD-X: a language
  adapter under a task adapter; any number of modules, e.g. language + domain + task);
* :class:`Sum` — deltas added into the weights, θ0 + δ_lang + δ_task (LT-SFT, Ansell et al. 2022);
* :class:`Fuse`, :class:`Average` — declared and validated; :func:`activate` refuses them by name.
  AdapterFusion (Pfeiffer et al. 2021) has learned weights, so it runs as a module of its own, a
  ``fusion`` module that carries the adapters it fuses (:mod:`xlpeft.methods.fusion`); averaging runs
  as a test-time ensemble (:mod:`xlpeft.ensemble`).

Which block a module may sit in follows its method's ``combine`` (``stack`` or ``sum``, see
:mod:`xlpeft.methods.base`), so a new method needs no edit here. A composition is written to
and read from ``xlpeft_composition.json`` with a checked format version (:mod:`xlpeft.composed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from xlpeft.errors import XlpeftError
from xlpeft.io import LoadedModule, load_module
from xlpeft.methods.adapterdrop import set_inference_drop
from xlpeft.methods.base import MODULE_KINDS, Applied
from xlpeft.registry import get_method
from xlpeft.vocab import composition_vocab, tokenizer_for, with_vocab

FORMAT_VERSION = 3
"""Version of the composition record. 3 adds ``adapter_drop``; 2 (a block tree, no AdapterDrop) and 1
(xlpeft 0.1: a list of slots, adapters under ``adapters/``) are still read. A reader that predates a
field must refuse the record rather than ignore what it cannot honour, hence a new version per field."""
READS = (1, 2, FORMAT_VERSION)

ALLOWED = {
    "stack": ("module", "stack", "sum", "fuse", "average"),
    "sum": ("module", "sum", "average"),
    "fuse": ("module", "stack"),
    "average": ("module",),
}
"""Which nodes each block may hold directly (``module``: a module reference)."""

COMBINES_IN = {"stack": ("stack", "sum"), "sum": ("sum",), "fuse": ("stack",), "average": ("stack", "sum")}
"""Which method ``combine`` values each block accepts for the modules it holds directly."""

EXECUTABLE = ("stack", "sum")


@dataclass(frozen=True)
class ModuleRef:
    """A leaf: one module, by what it is and where it comes from (a directory or ``NAME@VERSION``).

    ``module`` carries the loaded module once resolved; it is not part of the record.
    """

    kind: str  # language | task
    method: str
    name: str  # lang code or task name
    source: str
    module: LoadedModule | None = field(default=None, compare=False, repr=False)

    BLOCK: ClassVar[str] = "module"

    def __post_init__(self) -> None:
        if self.kind not in MODULE_KINDS:
            raise XlpeftError(f"a composition holds {' and '.join(MODULE_KINDS)} modules; {self.source} is a "
                              f"{self.kind!r} artifact")
        get_method(self.method)  # an unknown method names the registered ones

    @classmethod
    def of(cls, module: LoadedModule, source: str | None = None) -> ModuleRef:
        m = module.manifest
        return cls(m.kind, m.method, (m.lang if m.kind == "language" else m.task) or "?",
                   source or str(module.path), module)

    def leaves(self) -> list[ModuleRef]:
        return [self]

    def to_dict(self) -> dict[str, Any]:
        return {"module": {"kind": self.kind, "method": self.method, "name": self.name, "source": self.source}}

    def describe(self) -> str:
        return f"{self.kind}:{self.name}/{self.method}"


@dataclass(frozen=True)
class Block:
    """A composition block; subclasses only name themselves. Validated against :data:`ALLOWED` on creation."""

    children: tuple[Node, ...]

    BLOCK: ClassVar[str] = ""

    def __init__(self, *children: Node) -> None:
        object.__setattr__(self, "children", tuple(children))
        self.__post_init__()

    def __post_init__(self) -> None:
        if not self.children:
            raise XlpeftError(f"a {self.BLOCK} block needs at least one module or block")
        for child in self.children:
            if not isinstance(child, ModuleRef | Block):
                raise XlpeftError(f"a {self.BLOCK} block holds modules and blocks; got {type(child).__name__}")
            if child.BLOCK not in ALLOWED[self.BLOCK]:
                raise XlpeftError(f"a {self.BLOCK} block cannot hold a {child.BLOCK} block "
                                  f"(a {self.BLOCK} holds: {', '.join(ALLOWED[self.BLOCK])})")
            if isinstance(child, ModuleRef):
                combine = get_method(child.method).combine
                if combine not in COMBINES_IN[self.BLOCK]:
                    raise XlpeftError(f"a {self.BLOCK} block cannot hold {child.describe()}: {child.method} modules "
                                      f"combine by {combine}; put it in a {combine.capitalize()} block")

    def leaves(self) -> list[ModuleRef]:
        """Every module reference, bottom first (the order they are applied in)."""
        return [leaf for child in self.children for leaf in child.leaves()]

    def blocks(self) -> list[Block]:
        return [self] + [b for c in self.children if isinstance(c, Block) for b in c.blocks()]

    def to_dict(self) -> dict[str, Any]:
        return {self.BLOCK: [c.to_dict() for c in self.children]}

    def describe(self) -> str:
        return f"{self.BLOCK}({', '.join(c.describe() for c in self.children)})"


class Stack(Block):
    BLOCK = "stack"


class Sum(Block):
    BLOCK = "sum"


class Fuse(Block):
    BLOCK = "fuse"


class Average(Block):
    BLOCK = "average"


Node = ModuleRef | Block
BLOCKS: dict[str, type[Block]] = {b.BLOCK: b for b in (Stack, Sum, Fuse, Average)}


def node_from_dict(data: dict[str, Any]) -> Node:
    """Inverse of ``to_dict``; an unknown block names the known ones."""
    if not isinstance(data, dict) or len(data) != 1:
        raise XlpeftError(f"a composition node is one key (module or a block name); got {str(data)[:120]}")
    (key, value), = data.items()
    if key == "module":
        return ModuleRef(**value)
    if key not in BLOCKS:
        raise XlpeftError(f"unknown composition block {key!r}; known blocks: {', '.join(BLOCKS)}")
    return BLOCKS[key](*(node_from_dict(c) for c in value))


@dataclass(frozen=True)
class Composition:
    """A root block over modules, for one base. Validated on creation: at most one task module, on top.

    ``adapter_drop``: AdapterDrop at inference (Rücklé et al. 2021): every adapter-like module skips the
    lowest ``adapter_drop`` layers (:mod:`xlpeft.methods.adapterdrop`); recorded only when non-zero.
    """

    root: Block
    base_fingerprint: str
    adapter_drop: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.root, Block):
            raise XlpeftError(f"a composition's root is a block (Stack, Sum, ...); got {type(self.root).__name__}")
        if isinstance(self.adapter_drop, bool) or not isinstance(self.adapter_drop, int) or self.adapter_drop < 0:
            raise XlpeftError(f"adapter_drop should be a whole number of layers >= 0; got {self.adapter_drop!r}")
        leaves = self.root.leaves()
        tasks = [i for i, leaf in enumerate(leaves) if leaf.kind == "task"]
        if len(tasks) > 1:
            raise XlpeftError(f"a composition holds at most one task module; got {len(tasks)}: "
                              + ", ".join(leaves[i].describe() for i in tasks))
        if tasks and tasks[0] != len(leaves) - 1:
            raise XlpeftError("the task module must sit on top of the other modules (last, bottom first); got order "
                              + ", ".join(leaf.describe() for leaf in leaves))

    @classmethod
    def of(cls, modules: Sequence[ModuleRef], base_fingerprint: str) -> Composition:
        """The default shape for modules given bottom first: a Sum if every one is a delta, else a Stack.

        In a Stack, consecutive delta modules form a Sum block (they add into the weights together).
        """
        if not modules:
            raise XlpeftError("a composition needs at least one module")
        if all(get_method(m.method).combine == "sum" for m in modules):
            return cls(Sum(*modules), base_fingerprint)
        children: list[Node] = []
        run: list[ModuleRef] = []
        for m in [*modules, None]:
            if m is not None and get_method(m.method).combine == "sum":
                run.append(m)
                continue
            children += [Sum(*run)] if len(run) > 1 else run
            run = []
            if m is not None:
                children.append(m)
        return cls(Stack(*children), base_fingerprint)

    def leaves(self) -> list[ModuleRef]:
        return self.root.leaves()

    @property
    def task(self) -> ModuleRef | None:
        return next((leaf for leaf in self.leaves() if leaf.kind == "task"), None)

    def methods(self) -> str:
        """``lang_method+task_method`` (bottom first): the name of the composition in runs and tables."""
        return "+".join(leaf.method for leaf in self.leaves())

    def describe(self) -> str:
        return self.root.describe() + (f" adapter_drop={self.adapter_drop}" if self.adapter_drop else "")

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "base_fingerprint": self.base_fingerprint, "root": self.root.to_dict(),
                "adapter_drop": self.adapter_drop}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Composition:
        """Read a record written by :meth:`to_dict` (format 3), by xlpeft before AdapterDrop (2) or by xlpeft 0.1 (1, a list of slots)."""
        version = data.get("format_version")
        if version == 1 or (version is None and "slots" in data):
            refs = [ModuleRef(s["kind"], s["method"], s["name"], s["source"]) for s in data["slots"]]
            return cls.of(refs, data["base_fingerprint"])
        if version not in READS:
            raise XlpeftError(f"composition record has format version {version!r}; this xlpeft reads versions "
                              f"{', '.join(map(str, READS))}: upgrade xlpeft (pip install -U xlpeft) to read it")
        root = node_from_dict(data["root"])
        if not isinstance(root, Block):
            root = Stack(root)
        return cls(root, data["base_fingerprint"], data.get("adapter_drop", 0) if version == FORMAT_VERSION else 0)


@dataclass
class Active:
    """A composition applied to a base: per module its reference and :class:`~xlpeft.methods.base.Applied` handle."""

    composition: Composition | None = None
    entries: list[tuple[int, ModuleRef, Applied]] = field(default_factory=list)  # (position in leaves(), ref, handle)

    def modules(self) -> list[nn.Module]:
        return [m for _, _, handle in self.entries for m in handle.modules()]

    def tokenizer(self, base_tokenizer):
        """The tokenizer inputs of this composition need: the base's, or with a language module's new words."""
        return tokenizer_for(base_tokenizer, [ref.module for _, ref, _ in self.entries])  # :mod:`xlpeft.vocab`

    def remove(self) -> None:
        """Restore the bare base exactly: every module removed, newest first."""
        while self.entries:
            self.entries.pop()[2].remove()


def resolve_module(ref: str | Path | LoadedModule, fingerprint: str | None = None, base: Any = None) -> ModuleRef:
    """A module from a directory, the registry (``NAME``, ``NAME@VERSION``) or the hub (``hf:ORG/REPO[@REV]``).

    ``base`` converts a hub AdapterHub / peft / composable-sft module against it (see :mod:`xlpeft.hub`).
    """
    from xlpeft import tracking

    if isinstance(ref, LoadedModule):
        return ModuleRef.of(ref)
    text = str(ref)
    if text.startswith("hf:") and not Path(text).is_dir():
        from xlpeft.hub import hub_module

        hub = hub_module(text, base, fingerprint)
        return ModuleRef.of(load_module(hub.path), hub.source)  # the source pinned to the snapshot's commit
    if Path(text).is_dir():
        return ModuleRef.of(load_module(text), text)
    if not text.startswith("xlpeft-"):
        raise XlpeftError(f"module {text!r} is neither a directory nor a registered name (xlpeft-lang-..., "
                          "xlpeft-task-...) nor a hub id (hf:ORG/REPO)")
    path, reg = tracking.find_reference(text, fingerprint)
    return ModuleRef.of(load_module(path), f"{reg.name}@{reg.version}")


def bind(composition: Composition, fingerprint: str | None = None, base: Any = None) -> Composition:
    """The composition with every reference resolved (loaded once; references already loaded are kept)."""
    loaded = {id(leaf): leaf if leaf.module is not None else resolve_module(leaf.source, fingerprint, base)
              for leaf in composition.leaves()}

    def rebuild(node: Node) -> Node:
        if isinstance(node, ModuleRef):
            return loaded[id(node)]
        return type(node)(*(rebuild(c) for c in node.children))

    return Composition(rebuild(composition.root), composition.base_fingerprint, composition.adapter_drop)


def activate(base, composition: Composition | Sequence[LoadedModule], force: bool = False) -> Active:
    """Execute a composition on ``base``: apply every module, bottom first; all or nothing.

    Args:
        base: a :class:`~xlpeft.models.Base` (its model is changed in place until ``remove()``).
        composition: a :class:`Composition`, or loaded modules bottom first (the default shape, :meth:`Composition.of`).
        force: apply modules whose base fingerprint differs (you know the weights are the same).

    Raises:
        XlpeftError: a block that cannot run yet (Fuse, Average), a module trained on another base,
            or a module that does not fit; whatever was applied is removed again.
    """
    if not isinstance(composition, Composition):
        composition = Composition.of([ModuleRef.of(m) for m in composition], base.fingerprint)
    waiting = sorted({b.BLOCK for b in composition.root.blocks() if b.BLOCK not in EXECUTABLE})
    if waiting:
        raise XlpeftError(f"{composition.describe()}: {', '.join(waiting)} blocks are validated but not executed; use "
                          f"{' or '.join(EXECUTABLE)} blocks (a Fuse block's learned weights live in a fusion module: "
                          "train one with --method fusion --set fuse=A,B and compose it; Average: xlpeft compose --ensemble)")
    composition = bind(composition, base.fingerprint)
    composition_vocab([leaf.module for leaf in composition.leaves()])  # at most one module adds words
    active = Active(composition)
    try:
        for i, leaf in enumerate(composition.leaves()):
            leaf.module.check_base(base.fingerprint, force=force)
            handle = get_method(leaf.method).apply(base, leaf.module)
            active.entries.append((i, leaf, with_vocab(base.model, leaf.module, handle)))  # + its new words' rows
        set_inference_drop(active.modules(), composition.adapter_drop, len(base.layers))
    except BaseException:
        active.remove()
        raise
    return active


def check_same_base(base, modules: Sequence[LoadedModule]) -> None:
    """Refuse a module trained on another base, naming both fingerprints and the module."""
    for module in modules:
        theirs = module.manifest.base
        if theirs["fingerprint"] != base.fingerprint:
            raise XlpeftError(
                f"cannot compose {module.path}: it was trained on base {theirs.get('name')!r} "
                f"(fingerprint {theirs['fingerprint']}), but the base is {base.name!r} (fingerprint {base.fingerprint})"
            )


def compose(base, modules: Composition | Sequence[str | Path | LoadedModule], force: bool = False,
            adapter_drop: int | None = None) -> nn.Module:
    """Compose modules on a base into a Hugging Face model whose forward returns the usual outputs.

    Args:
        base: a :class:`~xlpeft.models.Base`, or anything :func:`~xlpeft.models.load_base` takes (or the
            directory of a composed model written by :func:`~xlpeft.composed.save_composed`, with no modules).
        modules: a :class:`Composition`, or module directories / registry references
            (``xlpeft-lang-sw-adapter[@3]``) / loaded modules, bottom first: language module(s), then the task module.
        force: compose even if a module's base fingerprint differs (you know the weights are the same).
        adapter_drop: AdapterDrop at inference (Rücklé et al. 2021): adapter-like modules skip the lowest
            ``adapter_drop`` layers; recorded in the composition. None keeps a given composition's own value (0 else).

    Returns:
        ``*ForMaskedLM`` (language modules only), ``*ForTokenClassification`` or
        ``*ForSequenceClassification`` (a task module on top), in eval mode, with the composition
        at ``model.xlpeft_composition``, the modules' own weights under ``model.xlpeft_modules`` and the
        tokenizer its inputs need at ``model.xlpeft_tokenizer`` (the base's, plus a language module's
        new words when it adds some: :mod:`xlpeft.vocab`).

    Raises:
        XlpeftError: a module was trained on another base (both fingerprints named), or the composition is invalid.
    """
    import dataclasses

    from xlpeft.composed import COMPOSITION_FILE, load_composed, target_model
    from xlpeft.models import Base, load_base

    if isinstance(base, str | Path) and not modules and (Path(base) / COMPOSITION_FILE).is_file():
        return load_composed(base)
    if not isinstance(base, str | Path | Base):
        raise XlpeftError(f"base should be a Base or a name/path; got {type(base).__name__}")
    if isinstance(base, str | Path):
        base = load_base(str(base))
    if isinstance(modules, Composition):
        composition = bind(modules, base.fingerprint, base)
    else:
        composition = Composition.of([resolve_module(m, base.fingerprint, base) for m in modules], base.fingerprint)
    if adapter_drop is not None:
        composition = dataclasses.replace(composition, adapter_drop=adapter_drop)
    loaded = [leaf.module for leaf in composition.leaves()]
    if not force:
        check_same_base(base, loaded)
    task = composition.task
    model = target_model(base, task.module if task is not None else None)
    active = activate(dataclasses.replace(base, model=model), composition, force=True)
    model.add_module("xlpeft_modules", nn.ModuleList(active.modules()))
    model.xlpeft_composition = composition
    model.xlpeft_active = active
    model.xlpeft_tokenizer = active.tokenizer(base.tokenizer)  # with a language module's new words, if it adds some
    return model.eval()
