"""Language and task packs: declarative YAML under ``language_packs/<code>/`` and ``task_packs/<task>/``.

Packs are looked up in ``$XLPEFT_PACKS`` (a directory holding ``language_packs/`` and
``task_packs/``), then the current directory, then the source checkout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xlpeft.data.corpora import CorpusSpec, parse_corpus
from xlpeft.errors import XlpeftError


def pack_roots() -> list[Path]:
    roots = []
    if os.environ.get("XLPEFT_PACKS"):
        roots.append(Path(os.environ["XLPEFT_PACKS"]))
    roots.append(Path.cwd())
    roots.append(Path(__file__).resolve().parent.parent)
    return roots


def find_pack_dir(folder: str, name: str) -> Path:
    tried = []
    for root in pack_roots():
        candidate = root / folder / name
        tried.append(str(candidate))
        if (candidate / "pack.yaml").is_file():
            return candidate
    available = sorted({p.parent.name for r in pack_roots() for p in (r / folder).glob("*/pack.yaml")})
    raise XlpeftError(
        f"no {folder[:-1].replace('_', ' ')} {name!r}; available: {', '.join(available) or 'none'} "
        f"(add {folder}/{name}/pack.yaml to create one)"
    )


def load_yaml(path: Path) -> dict[str, Any]:
    """Load a YAML mapping safely (no arbitrary object construction)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise XlpeftError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise XlpeftError(f"{path} should hold a mapping at top level; got {type(data).__name__}")
    return data


def _check_keys(path: Path, data: dict, required: set[str], optional: set[str]) -> None:
    missing = required - set(data)
    unknown = set(data) - required - optional
    if missing or unknown:
        raise XlpeftError(
            f"{path}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
            f"expected {sorted(required)} and optionally {sorted(optional)}"
        )


@dataclass(frozen=True)
class LanguagePack:
    """A language: its name and script, and named corpora (``default`` lists the ones used without --corpus)."""

    code: str
    name: str
    script: str
    corpora: dict[str, CorpusSpec]
    default: tuple[str, ...]
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve(self, specs: list[str] | None) -> list[CorpusSpec]:
        """Corpora for ``--corpus`` values: pack corpus names, paths, or ``hf:`` specs; none -> the defaults."""
        if not specs:
            return [self.corpora[name] for name in self.default]
        return [self.corpora[s] if s in self.corpora else parse_corpus(s) for s in specs]


def load_language_pack(code: str) -> LanguagePack:
    """Read ``language_packs/<code>/pack.yaml``."""
    pack_dir = find_pack_dir("language_packs", code)
    path = pack_dir / "pack.yaml"
    data = load_yaml(path)
    _check_keys(path, data, {"code", "name", "script", "corpora", "default"}, {"notes", "iso639_3", "udhr_id"})
    if data["code"] != code:
        raise XlpeftError(f"{path} declares code {data['code']!r} but lives in folder {code!r}; make them agree")
    corpora = {}
    for name, entry in (data["corpora"] or {}).items():
        if not isinstance(entry, dict):
            raise XlpeftError(f"{path}: corpus {name!r} should be a mapping with `path` or `hf`")
        entry = dict(entry)
        entry.pop("licence", None)
        entry.pop("source", None)
        if "path" in entry:
            entry["path"] = str(pack_dir / entry["path"])
        try:
            corpora[name] = CorpusSpec(**entry)
        except TypeError as exc:
            raise XlpeftError(f"{path}: corpus {name!r}: {exc}") from None
    default = tuple(data["default"] or ())
    unknown = [d for d in default if d not in corpora]
    if unknown:
        raise XlpeftError(f"{path}: default corpora {unknown} are not among the declared ones {sorted(corpora)}")
    extra = {k: data[k] for k in ("notes", "iso639_3", "udhr_id") if k in data}
    return LanguagePack(code, data["name"], data["script"], corpora, default, pack_dir, extra)
