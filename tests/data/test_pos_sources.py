"""The POS converters, the universal tag maps and CoNLL-U edge cases, on excerpts written here in the sources' formats.

Each excerpt copies the layout of the real file (Brown's tab-indented ``word/tag`` lines,
aksara's CRLF ``word/UPOS`` lines, Google's Turkish CoNLL-U with inflectional groups, khPOS's
``word/TAG`` with ``_``/``~`` joiners), so a converter that passes here reads the package.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xlpeft.data.pos_sources import (
    aksara_splits,
    khpos_splits,
    khpos_word,
    merge_inflectional_groups,
    read_brown,
    read_slash_tagged,
    read_turkish_treebank,
    split_of,
)
from xlpeft.data.tagmaps import UNIVERSAL_TAGS, TagMap, load_tag_map
from xlpeft.data.tasks import TaskSource, TokenExample, read_conllu, read_source
from xlpeft.errors import XlpeftError
from xlpeft.packs import load_task_pack

ROOT = Path(__file__).resolve().parents[2]
MAPPINGS = sorted((ROOT / "task_packs" / "pos" / "mappings").glob("*.yaml"))


def tag_map(name: str) -> TagMap:
    return load_tag_map(ROOT / "task_packs" / "pos" / "mappings" / f"{name}.yaml")


# Tags as they occur in the Brown files (lower-case, with -tl/-hl/-nc markers, fw- prefixes, + contractions, $ genitives).
BROWN_TAGS = ("at np-tl nn-tl jj-tl vbd nr in np$ nn `` '' cs dti nns . , rb ber vbn cc ql ap pps+bez ppss+md "
              "fw-nn fw-in+nn-tl * md* do* dod* bedz* hvd be ben bez bem ppo pp$ pp$$ ppl ppls wdt wps wpo wrb "
              "abn abx abl dt dts od cd cd-tl cd$ ex ex+bez uh rp to vb vbg vbz jjr jjs jjt rbr rbt nn$-tl "
              "nns-hl .-hl ( ) -- : np-hl in-hl at-hl nps nr-tl pn ppss+ber to+vb in+ppo nil").split()
UD_TAGS = "ADJ ADP ADV AUX CCONJ CONJ DET INTJ NOUN NUM PART PRON PROPN PUNCT SCONJ SYM VERB X _".split()
TURKISH_TAGS = "ADJ ADP ADV AFFIX CONJ DET NOUN NUM ONOM PRON PRT PUNCT VERB X".split()
KHPOS_TAGS = "AB JJ RB AUX CD CC CUR DT DBL ETC KAN UH M NN PA IN PRO PN QT RPN SYM VB_JJ VB VCOM".split()


def _brown_excerpt() -> str:
    words = [f"w{i}/{t}" for i, t in enumerate(BROWN_TAGS)]
    return "\n\n\t" + " ".join(words[:40]) + "\n\n\n\t" + " ".join(words[40:]) + " 1/2/cd\n"


@pytest.mark.parametrize("name, excerpt, reader", [
    ("brown", _brown_excerpt(), lambda text: read_brown(text, "ca01")),
    ("ud", " ".join(f"k{i}/{t}" for i, t in enumerate(UD_TAGS)) + "\r\n", lambda text: read_slash_tagged(text, "x")),
    ("khpos", " ".join(f"ក{i}_ខ/{t}" for i, t in enumerate(KHPOS_TAGS)) + "\n",
     lambda text: read_slash_tagged(text, "x", khpos_word)),
], ids=["brown", "ud", "khpos"])
def test_each_table_covers_every_tag_the_source_writes(name, excerpt, reader):
    examples = reader(excerpt)
    seen = {t for e in examples for t in e.tags}
    table = tag_map(name)
    assert seen and table.missing(seen) == []
    assert {table.apply(t) for t in seen} <= set(UNIVERSAL_TAGS)


def test_turkish_table_covers_the_treebank_tags():
    table = tag_map("turkish")
    assert table.missing(TURKISH_TAGS) == [] and {table.apply(t) for t in TURKISH_TAGS} <= set(UNIVERSAL_TAGS)


@pytest.mark.parametrize("path", MAPPINGS, ids=lambda p: p.name)
def test_shipped_mappings_load_with_universal_targets_and_a_cited_source(path):
    table = load_tag_map(path)
    assert set(table.table.values()) <= set(UNIVERSAL_TAGS)
    header = path.read_text(encoding="utf-8").split("\ncase:")[0]
    assert header.startswith("# ") and "Petrov" in header and "Used by: xlpeft" in header


def test_brown_rules_fold_markers_and_foreign_words():
    table = tag_map("brown")
    assert [table.apply(t) for t in ("nn-tl", "np$", "pps+bez", "fw-in+nn-tl", "nns-hl", "cs", "*", "``")] == \
        ["NOUN", "NOUN", "PRT", "X", "NOUN", "ADP", "ADV", "."]
    with pytest.raises(XlpeftError, match="'zz-tl'.*brown"):
        table.apply("zz-tl")


def test_read_brown_takes_the_tag_after_the_last_slash():
    (first, second) = read_brown(_brown_excerpt(), "ca01")
    assert second.tokens[-1] == "1/2" and second.tags[-1] == "cd"
    assert first.tags[:3] == ("at", "np-tl", "nn-tl")
    with pytest.raises(XlpeftError, match="ca01:2: expected `word/TAG`"):
        read_brown("\n\tThe/at jury\n", "ca01")


def test_ud_map_is_idempotent_on_the_universal_tags():
    table = tag_map("ud")
    assert all(table.apply(t) == t for t in UNIVERSAL_TAGS)
    assert all(table.apply(table.apply(t)) == table.apply(t) for t in UD_TAGS)
    assert load_task_pack("pos").labels == UNIVERSAL_TAGS


def test_khpos_words_lose_their_joiners_but_tags_keep_underscores():
    (ex,) = read_slash_tagged("លោក~ជំទាវ/PRO ក្រៅ_ពី/IN ធ្វើការ/VB_JJ តម្លា^ភាព/NN\n", "train.txt", khpos_word)
    assert ex == TokenExample(("លោកជំទាវ", "ក្រៅពី", "ធ្វើការ", "តម្លាភាព"), ("PRO", "IN", "VB_JJ", "NN"))
    with pytest.raises(XlpeftError, match="empty once its joiners"):
        read_slash_tagged("_/NN\n", "train.txt", khpos_word)


TURKISH = """# sent_id = tr-blog:00000584:S049
# text = Açıklanmayan soruların imkansız.
1\tAçık\taçık\tNOUN\tNN\t_\t2\tig\t_\tSpaceAfter=No
2\tla\t_\tVERB\tVB\t_\t3\tig\t_\tSpaceAfter=No
3\tnma\t_\tVERB\tVB\t_\t4\tig\t_\tSpaceAfter=No
4\tyan\t_\tADJ\tVJ\t_\t5\trcmod\t_\t_
5\tsoruların\tsoru\tNOUN\tNN\t_\t7\tposs\t_\t_
6\timkan\timkan\tNOUN\tNN\t_\t7\tig\t_\tSpaceAfter=No
7\tsız\t_\tVERB\tNOMP\t_\t0\troot\t_\tSpaceAfter=No
8\t.\t.\tPUNCT\t.\t_\t7\tp\t_\t_

# sent_id = tr-forum:00000222:S023
# text = Ctrl+Esc ?
1\tCtrl\tctrl\tNOUN\tNNP\t_\t0\troot\t_\tSpaceAfter=No
2\t+\t+\tPUNCT\t.\t_\t1\tp\t_\tSpaceAfter=No
3\tEsc\tesc\tNOUN\tNNP\t_\t1\tconj\t_\t_
4\t?\t?\tPUNCT\t.\t_\t1\tp\t_\t_
"""


def test_turkish_words_are_rebuilt_from_inflectional_groups_and_take_the_last_tag():
    (doc1, s1), (doc2, s2) = read_turkish_treebank(TURKISH, "web.conllu")
    assert (doc1, doc2) == ("tr-blog:00000584", "tr-forum:00000222")
    assert s1 == TokenExample(("Açıklanmayan", "soruların", "imkansız", "."), ("ADJ", "NOUN", "VERB", "PUNCT"))
    assert s2.tokens == ("Ctrl", "+", "Esc", "?")  # SpaceAfter=No without `ig` joins nothing


def test_turkish_malformed_groups_are_refused():
    row = "1\tAçık\taçık\tNOUN\tNN\t_\t2\tig\t_\t{}".split("\t")
    with pytest.raises(XlpeftError, match="followed by a space"):
        merge_inflectional_groups([[c.format("_") for c in row]], "x")
    with pytest.raises(XlpeftError, match="ends inside a word"):
        merge_inflectional_groups([[c.format("SpaceAfter=No") for c in row]], "x")


def test_splits_are_deterministic_and_sized_as_documented():
    keys = [f"doc{i}" for i in range(4000)]
    splits = [split_of(k, 10, 20) for k in keys]
    assert splits == [split_of(k, 10, 20) for k in keys]
    assert abs(splits.count("test") / 4000 - 0.20) < 0.03 and abs(splits.count("dev") / 4000 - 0.10) < 0.03
    lines = "".join(f"kata{i}/NOUN ./PUNCT\r\n" for i in range(1100))
    out = aksara_splits({"preprocessed.txt": lines.encode()})
    assert [e.tokens[0] for e in out["test"]] == [f"kata{i}" for i in range(1000)]  # the PUD part
    assert len(out["train"]) + len(out["dev"]) == 100 and out["dev"]
    km = khpos_splits({"k/data/train.txt": "ក/NN\n".encode() * 50, "k/data/val.txt": "ខ/VB\n".encode() * 3})
    assert [e.tokens for e in km["test"]] == [("ខ",)] * 3 and len(km["train"]) + len(km["dev"]) == 50


def _conllu(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.conllu"
    path.write_text(text, encoding="utf-8")
    return path


UD = ("# newdoc id = d1\n# text = Vámonos al mar.\n"
      "1-2\tVámonos\t_\t_\t_\t_\t_\t_\t_\t_\n"
      "1\tVamos\tir\tVERB\t_\t_\t0\troot\t_\t_\n"
      "2\tnos\tnosotros\tPRON\t_\t_\t1\tobj\t_\t_\n"
      "3-4\tal\t_\t_\t_\t_\t_\t_\t_\t_\n"
      "3\ta\ta\tADP\t_\t_\t5\tcase\t_\t_\n"
      "4\tel\tel\tDET\t_\t_\t5\tdet\t_\t_\n"
      "4.1\tva\tir\tVERB\t_\t_\t_\t_\t0:root\t_\n"
      "5\tmar\tmar\tNOUN\t_\t_\t1\tobl\t_\tSpaceAfter=No\n"
      "6\t.\t.\tPUNCT\t_\t_\t1\tpunct\t_\t_\r\n"
      "\n# sent_id = 2\n1\tHola\thola\tINTJ\t_\t_\t0\troot\t_\t_\n\n")


def test_conllu_multiword_tokens_empty_nodes_comments_and_space_after(tmp_path):
    first, second = read_conllu(_conllu(tmp_path, UD))
    # words, not the surface token "Vámonos"; no empty node; "mar" and "." stay two words (SpaceAfter=No is layout)
    assert first == TokenExample(("Vamos", "nos", "a", "el", "mar", "."), ("VERB", "PRON", "ADP", "DET", "NOUN", "PUNCT"))
    assert second == TokenExample(("Hola",), ("INTJ",))
    with pytest.raises(XlpeftError, match=r"x.conllu:1: a CoNLL-U ID .* got 'one'"):
        read_conllu(_conllu(tmp_path, "one\ta\ta\tX\t_\t_\t0\troot\t_\t_\n"))


def test_any_ud_treebank_reads_into_the_universal_pos_labels(tmp_path):
    pack = load_task_pack("pos")
    examples = read_source(TaskSource(path=str(_conllu(tmp_path, UD))), pack.head, list(pack.labels), pack.input_map)
    assert [e.tags for e in examples] == [("VERB", "PRON", "ADP", "DET", "NOUN", "."), ("X",)]
    with pytest.raises(XlpeftError, match=r"\[.PUNCT.\].*does not know"):  # without the pack's map, UPOS is refused
        read_source(TaskSource(path=str(tmp_path / "x.conllu")), pack.head, list(pack.labels))
