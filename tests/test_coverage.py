"""Tokenizer coverage of a pack's text (xlpeft coverage): the counts, a pack's own text, the command."""

from __future__ import annotations

from xlpeft.coverage import measure, pack_coverage, table
from xlpeft.models import load_base
from xlpeft.packs import load_language_pack


def test_counts_unknown_tokens_characters_and_words(base_dirs):
    tok = load_base(str(base_dirs["tiny-bert"])).tokenizer
    plain = measure(tok, ["the cat sat", "a dog"])
    assert (plain.lines, plain.words, plain.chars) == (2, 5, 13)
    assert plain.tokens == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in ("the cat sat", "a dog"))
    odd = measure(tok, ["\u2603\u2603 \u2603"])  # snowmen: not in a vocabulary trained on Latin text
    assert odd.unknown >= 1 and odd.unk_rate > plain.unk_rate and odd.words == 2 and odd.chars == 3


def test_a_pack_is_measured_on_its_own_text_and_the_table_sorts_worst_last(base_dirs):
    tok = load_base(str(base_dirs["tiny-bert"])).tokenizer
    km = pack_coverage(tok, load_language_pack("km"), max_lines=50)  # Khmer script: the tiny vocabulary lacks it
    en = pack_coverage(tok, load_language_pack("en"), max_lines=50)
    assert km.lang == "km" and km.script == "Khmr" and 0 < km.lines <= 50
    assert km.unk_rate > en.unk_rate
    lines = table([km, en]).splitlines()
    assert lines[1].startswith("en") and lines[2].startswith("km")


def test_the_command_prints_one_row_per_pack(base_dirs, capsys):
    from xlpeft.cli import main

    main(["coverage", "--base", str(base_dirs["tiny-bert"]), "--langs", "sw,km", "--max-lines", "20"])
    out = capsys.readouterr().out.splitlines()
    rows, hint = out[1:-1], out[-1]
    assert out[0].split()[:3] == ["lang", "script", "lines"] and [row.split()[0] for row in rows] in (["sw", "km"], ["km", "sw"])
    assert "--set new_tokens=N" in hint  # what to do about a language cut finely
