"""Ranking the languages that stand in for a target without a module (xlpeft.related), from the packs' metadata."""

from __future__ import annotations

import pytest

from xlpeft.errors import XlpeftError
from xlpeft.packs import language_pack
from xlpeft.related import MAX_FALLBACKS, closest, relatedness


def test_every_pack_names_its_family_genus_and_script():
    for code in ("am", "en", "ha", "id", "ig", "km", "rw", "sw", "tr", "yo"):
        pack = language_pack(code)
        assert pack.family and pack.genus and pack.script not in ("", "?"), code


def test_genus_outranks_family_which_outranks_script():
    chosen, ranked = closest("rw", ["en", "yo", "sw", "km"])
    assert [r.lang for r in chosen] == ["sw"]
    assert [(r.lang, r.score) for r in ranked] == [("sw", 7), ("yo", 3), ("en", 1), ("km", 0)]
    assert chosen[0].shared == ("genus Bantoid", "family Atlantic-Congo", "script Latn")
    assert relatedness(language_pack("am"), language_pack("ha")).shared == ("family Afro-Asiatic",)


def test_languages_tied_at_the_best_score_are_all_chosen_up_to_the_limit():
    chosen, _ = closest("ig", ["sw", "yo", "rw", "en"])  # three Atlantic-Congo languages of other genera
    assert [r.lang for r in chosen] == ["rw", "sw", "yo"][:MAX_FALLBACKS] and {r.score for r in chosen} == {3}


@pytest.mark.parametrize(("target", "candidates", "needle"), [
    ("km", ["en", "sw"], "no language with a registered module shares a genus, family or script with km"),
    ("fr", ["en"], "fr (French) has no language pack naming its family"),
])
def test_nothing_to_rank_by_is_a_one_line_error(target, candidates, needle):
    with pytest.raises(XlpeftError, match=needle.replace("(", r"\(").replace(")", r"\)")) as info:
        closest(target, candidates)
    assert "\n" not in str(info.value)
