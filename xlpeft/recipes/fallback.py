"""``compose --fallback related``: which registered language modules stand in for a target that has none.

The ranking is :mod:`xlpeft.related`'s (genus, family, script from the language packs); this module
only asks the registry which languages have a module on the base, and decides: the target's own
module if it has one, else the closest language's, else (several tied) an ensemble of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from xlpeft import tracking
from xlpeft.errors import XlpeftError
from xlpeft.models import fingerprint_dir, resolve_base_dir
from xlpeft.packs import language_pack
from xlpeft.related import Related, closest


@dataclass(frozen=True)
class Fallback:
    """The languages whose modules stand in for ``target`` (``chosen``), and every candidate ranked."""

    target: str
    chosen: tuple[Related, ...]
    ranked: tuple[Related, ...]

    def describe(self) -> str:
        """One line for stderr and the run's tags: who stands in and why, then the others considered."""
        rest = [r.why() for r in self.ranked if r not in self.chosen]
        head = (f"{self.target} has no language module on this base; using the closest language's module: "
                if len(self.chosen) == 1 else
                f"{self.target} has no language module on this base; {len(self.chosen)} languages tie as closest, "
                "so their modules are ensembled: ")
        return head + "; ".join(r.why() for r in self.chosen) + (f" (also considered: {'; '.join(rest)})" if rest else "")


def registered_languages(fingerprint: str, method: str | None) -> list[str]:
    """Languages (with a language pack) that have a registered module on the base ``fingerprint`` (of ``method``)."""
    langs = set()
    for name in tracking.list_registered():
        try:
            kind, lang, found = tracking.parse_registered_name(name)
            language_pack(lang)  # merged modules (sw+tr) and unknown codes are no candidates
        except XlpeftError:
            continue
        if kind == "language" and method in (None, found) and any(
                v.tags.get("xlpeft.base_fingerprint") == fingerprint for v in tracking.list_versions(name)):
            langs.add(lang)
    return sorted(langs)


def plan_fallback(lang: str, base: str, lang_method: str | None) -> Fallback | None:
    """None if ``lang`` has its own registered module on ``base``; else the closest languages that have one.

    Raises:
        XlpeftError: no language with a module shares anything with ``lang`` (see :func:`xlpeft.related.closest`).
    """
    fingerprint = fingerprint_dir(resolve_base_dir(base))
    candidates = registered_languages(fingerprint, lang_method)
    if lang in candidates:
        return None
    if not candidates:
        raise XlpeftError(f"--fallback related: no language module is registered on base {base!r}"
                          f"{f' with method {lang_method}' if lang_method else ''} in {tracking.tracking_uri()}; "
                          "train one with `xlpeft train-lang`")
    chosen, ranked = closest(lang, candidates)
    return Fallback(lang, tuple(chosen), tuple(ranked))
