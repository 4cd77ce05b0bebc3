"""ISO 639 language codes: any valid code works, with or without a language pack.

A language pack is a convenience (named corpora, defaults), not a gate: ``train-lang --lang xx
--corpus my.txt`` and ``compose --lang xx --eval-data my.conllu`` work for every language the
ISO 639 tables know. Codes are validated against ISO 639-3 (with the two-letter ISO 639-1 and the
bibliographic ISO 639-2/B codes that map onto it) and ISO 639-5 language families, as shipped by
``pycountry`` (data from SIL International, the ISO 639-3 registration authority). A region or
script suffix (``hau_NG``, ``zh-Hant``, ``sr-Latn``) is kept in the code and ignored for validation.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache

from xlpeft.errors import XlpeftError

SUFFIX = re.compile(r"[-_]")


@dataclass(frozen=True)
class Language:
    """A validated language code: as the user wrote it, its ISO 639-3 (or 639-5) code and English name."""

    code: str
    iso639_3: str
    name: str

    def describe(self) -> str:
        return f"{self.code} ({self.name})"


@lru_cache(maxsize=1)
def _tables() -> dict[str, tuple[str, str]]:
    """lower-case code -> (ISO 639-3 or 639-5 code, English name), for 639-1, 639-2/B, 639-3 and 639-5 codes."""
    import pycountry

    table: dict[str, tuple[str, str]] = {}
    for lang in pycountry.languages:
        entry = (lang.alpha_3, lang.name)
        for key in (lang.alpha_3, getattr(lang, "alpha_2", None), getattr(lang, "bibliographic", None)):
            if key:
                table.setdefault(key.lower(), entry)
    for family in pycountry.language_families:
        table.setdefault(family.alpha_3.lower(), (family.alpha_3, family.name))
    return table


def lookup(code: str) -> Language:
    """The language ``code`` names (``sw``, ``swh``, ``hau_NG``, ``zh-Hant``...).

    Raises:
        XlpeftError: the primary subtag is not an ISO 639 code; the message suggests codes whose
            language names resemble it, and says how to look one up.
    """
    primary = SUFFIX.split(code, maxsplit=1)[0].lower()
    hit = _tables().get(primary)
    if hit is None:
        raise XlpeftError(f"{code!r} is not an ISO 639 language code (639-1 like sw, 639-3 like swh, or 639-5)"
                          f"{_suggest(primary)}; look codes up at https://iso639-3.sil.org/code_tables/639/data")
    return Language(code, *hit)


def _suggest(text: str) -> str:
    """``; did you mean ...`` from language names starting with ``text`` (``swahili``), else similar codes."""
    table = _tables()
    by_name = [k for k, (iso, name) in table.items() if len(text) >= 3 and name.lower().startswith(text) and k == iso.lower()]
    close = by_name[:3] or difflib.get_close_matches(text, list(table), n=3, cutoff=0.8)
    return "; did you mean " + ", ".join(f"{k} ({table[k][1]})" for k in close) if close else ""
