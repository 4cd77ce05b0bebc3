"""Part-of-speech tag mappings onto the universal tagset of Petrov, Das & McDonald (2012).

Why: zero-shot transfer needs one label set for the source and every target language. The
12 universal tags ("A Universal Part-of-Speech Tagset", LREC 2012) are coarse enough that
the Brown corpus, UD treebanks, Google's Turkish treebank and khPOS all map onto them.

A mapping is declarative data: a YAML file under ``task_packs/pos/mappings/`` with

* ``map``: source tag -> universal tag (every target must be one of :data:`UNIVERSAL_TAGS`);
* ``case``: ``upper`` to upper-case a tag before the lookup (the Brown files write ``nn-tl``,
  the table is written as ``NN``), else ``keep``;
* ``prefixes``: tag prefix -> universal tag, checked first (Brown's ``FW-`` foreign words);
* ``strip``: markers removed from every component of a tag before the lookup (Brown's
  ``-TL`` title, ``-HL`` headline, ``-NC`` citation markers, which do not change the class).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from xlpeft.errors import XlpeftError

UNIVERSAL_TAGS: tuple[str, ...] = ("VERB", "NOUN", "PRON", "ADJ", "ADV", "ADP", "CONJ", "DET", "NUM", "PRT", "X", ".")
"""The 12 universal tags, in the order of Petrov, Das & McDonald (2012), Table 1 ("." is punctuation)."""

_KEYS = {"map", "case", "prefixes", "strip"}


@dataclass(frozen=True)
class TagMap:
    """A source tagset -> universal tags table; :meth:`apply` maps one tag."""

    name: str
    table: dict[str, str]
    case: str = "keep"  # keep | upper
    prefixes: dict[str, str] = field(default_factory=dict)
    strip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.case not in ("keep", "upper"):
            raise XlpeftError(f"tag map {self.name}: `case` should be keep or upper; got {self.case!r}")
        bad = sorted({v for v in [*self.table.values(), *self.prefixes.values()] if v not in UNIVERSAL_TAGS})
        if bad:
            raise XlpeftError(f"tag map {self.name}: targets {bad} are not universal tags "
                              f"({' '.join(UNIVERSAL_TAGS)}); fix the table")

    def normalise(self, tag: str) -> str:
        """The table key for ``tag``: case folded, markers stripped (``nn-tl+bez`` -> ``NN+BEZ``)."""
        key = tag.upper() if self.case == "upper" else tag
        for marker in self.strip:  # a marker ends a component: before '+', '-' or the end of the tag
            key = re.sub(re.escape(marker) + r"(?=$|[+-])", "", key)
        return key

    def get(self, tag: str) -> str | None:
        """The universal tag for ``tag``, or None when the table does not cover it."""
        folded = tag.upper() if self.case == "upper" else tag
        for prefix, target in self.prefixes.items():
            if folded.startswith(prefix):
                return target
        return self.table.get(self.normalise(tag))

    def apply(self, tag: str) -> str:
        """The universal tag for ``tag``; a tag the table does not cover is an error naming it."""
        target = self.get(tag)
        if target is None:
            raise XlpeftError(f"tag {tag!r} (looked up as {self.normalise(tag)!r}) is not in the tag map {self.name}; "
                              "add it to the mapping file")
        return target

    def missing(self, tags: Iterable[str]) -> list[str]:
        """Tags among ``tags`` that the table does not cover, sorted (empty when it covers them all)."""
        return sorted({t for t in tags if self.get(t) is None})


def load_tag_map(path: Path) -> TagMap:
    """Read a mapping file (see the module docstring); unknown keys and non-universal targets are errors."""
    from xlpeft.packs import load_yaml

    data = load_yaml(path)
    unknown = sorted(set(data) - _KEYS)
    if unknown or not isinstance(data.get("map"), dict):
        raise XlpeftError(f"{path}: a tag map holds `map` (tag -> universal tag) and optionally "
                          f"{sorted(_KEYS - {'map'})}; got keys {sorted(map(str, data))}")
    table = {str(k): str(v) for k, v in data["map"].items()}
    prefixes = {str(k): str(v) for k, v in (data.get("prefixes") or {}).items()}
    return TagMap(path.stem, table, str(data.get("case", "keep")), prefixes, tuple(str(s) for s in data.get("strip") or ()))


def mapping_path(name: str) -> Path:
    """``task_packs/pos/mappings/<name>.yaml`` in the first pack root that has the pos pack."""
    from xlpeft.packs import find_pack_dir

    path = find_pack_dir("task_packs", "pos") / "mappings" / f"{name}.yaml"
    if not path.is_file():
        raise XlpeftError(f"no tag map {path}; the pos task pack ships brown, ud, turkish and khpos")
    return path
