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


# ---- a language without a pack, through the CLI

def test_a_language_without_a_pack_trains_on_its_own_corpus(workdir, base_dirs, sw_corpus, capsys):
    from tests.hostile.conftest import run_cli
    from xlpeft import tracking

    base = str(base_dirs["tiny-bert"])
    done = run_cli(capsys, "train-lang", "--lang", "quz", "--base", base, "--corpus", sw_corpus, "--max-steps", "2",
                   "--set", "max_seq_len=32")
    assert done.code == 0, done.err
    _, reg = tracking.find_module("language", "quz", "adapter")
    run = tracking.client().get_run(reg.run_id)
    assert run.data.tags["xlpeft.lang"] == "quz" and run.data.tags["xlpeft.lang_name"] == "Cusco Quechua"

    no_corpus = run_cli(capsys, "train-lang", "--lang", "quz", "--base", base, "--max-steps", "2")
    assert no_corpus.code == 2 and "quz (Cusco Quechua) has no language pack" in no_corpus.err
    assert "--corpus FILE" in no_corpus.err
    wrong = run_cli(capsys, "train-lang", "--lang", "zzq", "--base", base, "--corpus", sw_corpus)
    assert wrong.code == 2 and "'zzq' is not an ISO 639 language code" in wrong.err
    wrong_task = run_cli(capsys, "train-task", "--task", "ner", "--lang", "zzq", "--base", base)
    assert wrong_task.code == 2 and "'zzq' is not an ISO 639 language code" in wrong_task.err
