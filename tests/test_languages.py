"""ISO 639 validation: any real code works with or without a pack; a wrong one gets suggestions."""

import pytest

from xlpeft.errors import XlpeftError
from xlpeft.languages import lookup


@pytest.mark.parametrize("code, iso, name", [
    ("sw", "swa", "Swahili"), ("swh", "swh", "Swahili"), ("km", "khm", "Khmer"), ("ind", "ind", "Indonesian"),
    ("fre", "fra", "French"),  # ISO 639-2/B
    ("nah", "nah", "Nahuatl"),  # ISO 639-5 family
    ("hau_NG", "hau", "Hausa"), ("zh-Hant", "zho", "Chinese"),  # region / script suffixes kept, not validated
])
def test_valid_codes_resolve_to_iso639_3_and_a_name(code, iso, name):
    lang = lookup(code)
    assert (lang.code, lang.iso639_3) == (code, iso)
    assert name in lang.name and name in lang.describe()


@pytest.mark.parametrize("code, suggestion", [("swahili", "swa (Swahili"), ("engl", "eng (English)"), ("qqq", None)])
def test_invalid_codes_are_one_error_with_suggestions(code, suggestion):
    with pytest.raises(XlpeftError, match=f"'{code}' is not an ISO 639 language code") as err:
        lookup(code)
    if suggestion:
        assert f"did you mean {suggestion}" in str(err.value)
    assert "iso639-3.sil.org" in str(err.value)
