"""Closest languages for a target that has no language module: ``xlpeft compose --fallback related``.

Transfer to an unseen language works best through related languages' modules (Pfeiffer et al.
2021, "UNKs Everywhere", and the ensembles of Wang et al. 2021 use typologically close
languages); the source-language module is the worst stand-in for a distant target. A language
pack names the language's Glottolog family, WALS genus and ISO 15924 script; the candidates are
the languages that have a registered module on the base, ranked by what they share with the
target (genus before family before script). The ranking is a default, stated with its reasons,
not a learned similarity: the user can always name the modules with ``--ensemble``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xlpeft.errors import XlpeftError
from xlpeft.packs import LanguagePack, language_pack

WEIGHTS = {"genus": 4, "family": 2, "script": 1}  # a shared genus outranks a shared family and script
MAX_FALLBACKS = 3  # languages tied at the best score beyond this are left out (named in the message)


@dataclass(frozen=True)
class Related:
    """A candidate language and what it shares with the target (``("genus Bantoid", "family Atlantic-Congo")``)."""

    lang: str
    score: int
    shared: tuple[str, ...]

    def why(self) -> str:
        return f"{self.lang} (same {', same '.join(self.shared)})" if self.shared else f"{self.lang} (nothing shared)"


def relatedness(target: LanguagePack, other: LanguagePack) -> Related:
    """What ``other`` shares with ``target``: genus, family, script (unknown values never match)."""
    pairs = {"genus": (target.genus, other.genus), "family": (target.family, other.family),
             "script": (target.script, other.script)}
    shared = [key for key, (mine, theirs) in pairs.items() if mine not in ("", "?") and mine == theirs]
    return Related(other.code, sum(WEIGHTS[k] for k in shared), tuple(f"{k} {pairs[k][0]}" for k in shared))


def closest(target: str, candidates: Iterable[str]) -> tuple[list[Related], list[Related]]:
    """The candidates tied at the best score above zero (at most :data:`MAX_FALLBACKS`), and all of them ranked.

    Raises:
        XlpeftError: the target's pack names no family, genus or script to compare, or no candidate
            shares any of them with the target (the ranking is in the message).
    """
    me = language_pack(target)
    if not (me.family or me.genus or me.script not in ("", "?")):
        raise XlpeftError(f"--fallback related: {target} ({me.name}) has no language pack naming its family, genus "
                          f"and script, so no language can be called closest; add language_packs/{target}/pack.yaml "
                          "with family:, genus: and script:, or name the modules with --ensemble LANGS")
    ranked = sorted((relatedness(me, language_pack(c)) for c in dict.fromkeys(candidates) if c != target),
                    key=lambda r: (-r.score, r.lang))
    if not ranked or ranked[0].score == 0:
        held = ", ".join(r.lang for r in ranked) or "none"
        raise XlpeftError(f"--fallback related: no language with a registered module shares a genus, family or script "
                          f"with {target} ({me.name}: {me.genus or '?'}, {me.family or '?'}, {me.script}); modules "
                          f"exist for: {held}. Train one for a related language, or name the modules with --ensemble")
    best = [r for r in ranked if r.score == ranked[0].score]
    return best[:MAX_FALLBACKS], ranked
