"""New vocabulary carried by a language module: the words chosen, their rows' hooks, training, composing, refusals."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.conftest import EN_WORDS, SW_WORDS, make_lines
from xlpeft.errors import XlpeftError
from xlpeft.io import load_module
from xlpeft.models import load_base
from xlpeft.vocab import AppliedVocab, NewVocab, extended_tokenizer, rows_for, select_words
from xlpeft.vocab.pieces import base_ids, select_pieces


@pytest.fixture(params=["tiny-bert", "tiny-xlmr"])
def arch_base(request, base_dirs):
    return load_base(str(base_dirs[request.param]))


def _vocab(base, n: int = 4) -> NewVocab:
    return NewVocab(tuple(select_words(make_lines(SW_WORDS, 100, seed=2), base.tokenizer, n)), len(base.tokenizer))


def test_words_chosen_are_frequent_split_and_new(arch_base):
    tok = arch_base.tokenizer
    lines = ["kwanzaa kwanzaa kwanzaa mimi", "kwanzaa nadra mimi mimi"]  # nadra: once
    words = select_words(lines, tok, 10, min_count=2)
    assert words == [w for w in ("kwanzaa", "mimi") if len(tok(w, add_special_tokens=False)["input_ids"]) >= 2
                     and w not in tok.get_vocab()]
    assert "nadra" not in words  # below min_count
    assert select_words(lines, tok, 1, min_count=2) == words[:1]  # the most frequent first


def test_extended_tokenizer_gives_the_words_their_ids_and_leaves_the_base_alone(arch_base):
    tok = arch_base.tokenizer
    vocab = _vocab(arch_base)
    before = len(tok)
    ext = extended_tokenizer(tok, vocab)
    assert len(tok) == before and len(ext) == before + len(vocab.tokens)
    text = f"{vocab.tokens[0]} {SW_WORDS[0]} {vocab.tokens[1]}"
    ids = ext(text, add_special_tokens=False)["input_ids"]
    assert vocab.first_id in ids and vocab.first_id + 1 in ids  # one token each
    assert len(ids) < len(tok(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(XlpeftError, match="another tokenizer"):
        extended_tokenizer(ext, vocab)  # a tokenizer of another length: not the module's base


def test_rows_start_as_the_mean_of_the_pieces_they_replace(arch_base):
    vocab = _vocab(arch_base)
    rows = rows_for(arch_base.model, vocab)
    rows.init_from_pieces(arch_base.model, arch_base.tokenizer)
    emb = arch_base.model.get_input_embeddings().weight
    for i, word in enumerate(vocab.tokens):
        pieces = arch_base.tokenizer(word, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(rows.weight[i], emb[pieces].mean(0), rtol=0, atol=1e-6)
    assert rows.bias is not None  # the masked-LM decoder has a bias: new tokens get its pieces' mean


def test_hooks_leave_old_ids_exact_read_new_rows_and_score_them(arch_base):
    model, tok = arch_base.model, arch_base.tokenizer
    vocab = _vocab(arch_base)
    ext = extended_tokenizer(tok, vocab)
    rows = rows_for(model, vocab)
    with torch.no_grad():
        rows.weight.normal_(generator=torch.Generator().manual_seed(0))
        rows.bias.normal_(generator=torch.Generator().manual_seed(1))
    plain = tok(" ".join(SW_WORDS[:6]), return_tensors="pt")
    with torch.no_grad():
        bare = model(**plain).logits  # (1, T, V)
        applied = AppliedVocab(model, rows)
        hooked = model(**plain).logits  # (1, T, first + N)
        mixed = ext(f"{SW_WORDS[0]} {vocab.tokens[0]}", return_tensors="pt")
        emb_out = model.get_input_embeddings()(mixed["input_ids"])  # (1, T, H)
        mixed_logits = model(**mixed).logits
        applied.remove()
        after = model(**plain).logits
    first = vocab.first_id
    assert hooked.shape[-1] == first + len(vocab.tokens)
    assert torch.equal(hooked[..., :first], bare[..., :first])  # nothing changes for the base's own ids
    assert torch.equal(after, bare)  # removed: the bare base again
    where = mixed["input_ids"][0] == first
    assert where.sum() == 1
    assert torch.equal(emb_out[0, where], rows.weight[:1])  # the new id reads its row
    assert torch.isfinite(mixed_logits).all() and mixed_logits.shape[-1] == first + len(vocab.tokens)


def test_train_lang_with_new_tokens_trains_and_composes_them(workdir, base_dirs, sw_corpus, capsys):
    from xlpeft import compose, load_module
    from xlpeft.cli import main

    base_dir = str(base_dirs["tiny-bert"])
    common = ["train-lang", "--lang", "sw", "--base", base_dir, "--corpus", str(sw_corpus), "--max-steps", "6",
              "--set", "max_seq_len=32", "--set", "lr=1e-2"]
    main([*common, "--set", "new_tokens=5", "--output", str(workdir / "lang-vocab")])
    main([*common, "--output", str(workdir / "lang-plain")])
    module = load_module(workdir / "lang-vocab")
    vocab = NewVocab.from_extra(module.manifest.extra)
    assert vocab is not None and len(vocab.tokens) == 5 and set(module.tensors["vocab"]) == {"weight", "bias"}
    base = load_base(base_dir)
    init = rows_for(base.model, vocab)
    init.init_from_pieces(base.model, base.tokenizer)
    assert not torch.allclose(module.tensors["vocab"]["weight"], init.weight)  # the rows were trained
    from xlpeft.hub_card import model_card

    assert "adds 5 whole-word tokens" in model_card(module, "org/sw-vocab")  # the hub card tells how to tokenize
    model = compose(base_dir, [workdir / "lang-vocab"])
    plain_model = compose(base_dir, [workdir / "lang-plain"])
    assert len(model.xlpeft_tokenizer) == len(base.tokenizer) + 5 and plain_model.xlpeft_tokenizer is not None
    text = f"{vocab.tokens[0]} {vocab.tokens[1]} {SW_WORDS[-1]}"
    enc = model.xlpeft_tokenizer(text, return_tensors="pt")
    assert (enc["input_ids"] >= vocab.first_id).sum() == 2
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] == vocab.first_id + 5 and torch.isfinite(logits).all()


def test_what_cannot_carry_new_tokens_is_refused(workdir, base_dirs, sw_corpus, ner_files, capsys, tmp_path):
    from xlpeft import compose, load_module
    from xlpeft.cli import main
    from xlpeft.composed import save_composed

    base_dir = str(base_dirs["tiny-bert"])
    common = ["train-lang", "--lang", "sw", "--method", "sft", "--base", base_dir, "--corpus", str(sw_corpus),
              "--max-steps", "2", "--set", "max_seq_len=32", "--set", "num_params=300", "--set", "new_tokens=3"]
    main([*common, "--output", str(workdir / "a")])
    main([*common, "--seed", "2", "--output", str(workdir / "b")])
    with pytest.raises(XlpeftError, match="both add new vocabulary"):
        compose(base_dir, [workdir / "a", workdir / "b"])
    with pytest.raises(XlpeftError, match="model.xlpeft_tokenizer"):  # the base's tokenizer lacks the new words
        save_composed(compose(base_dir, [workdir / "a"]), tmp_path / "composed", load_base(base_dir).tokenizer)
    from xlpeft.interop import convert
    from xlpeft.merging import check_mergeable

    with pytest.raises(XlpeftError, match="cannot be merged"):
        check_mergeable([load_module(workdir / "a"), load_module(workdir / "b")])

    with pytest.raises(XlpeftError, match="exporting would drop them"):
        convert(workdir / "a", tmp_path / "ah", "xlpeft", "adapterhub")
    assert not (tmp_path / "ah").exists()
    for setting in ("new_tokens=3", "new_token_unit=piece"):
        with pytest.raises(SystemExit) as exit_info:
            main(["train-task", "--task", "ner", "--lang", "en", "--base", base_dir, "--train-data",
                  str(ner_files["train"]), "--set", "lang_module=none", "--set", setting, "--max-steps", "2"])
        assert exit_info.value.code == 2 and "for language modules" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*common[:-1], "new_tokens=3", "--set", "new_token_min_count=100000", "--output", str(workdir / "c")])
    assert exit_info.value.code != 0 and "nothing to add" in capsys.readouterr().err


def test_compose_cli_scores_with_the_extended_tokenizer_and_saves_it(workdir, base_dirs, sw_corpus, ner_files,
                                                                     capsys, monkeypatch):
    import xlpeft.recipes.compose as recipe
    from tests.conftest import write_conll
    from xlpeft import compose
    from xlpeft.cli import main

    base_dir = str(base_dirs["tiny-bert"])
    main(["train-lang", "--lang", "sw", "--base", base_dir, "--corpus", str(sw_corpus), "--max-steps", "2",
          "--set", "max_seq_len=32", "--set", "new_tokens=4"])
    main(["train-task", "--task", "ner", "--lang", "en", "--base", base_dir, "--train-data", str(ner_files["train"]),
          "--set", "lang_module=none", "--max-steps", "2", "--set", "max_seq_len=32"])
    eval_file = write_conll(workdir / "sw.conll", [[(w, "O") for w in line.split()[:8]]
                                                    for line in make_lines(SW_WORDS, 12, seed=5)])
    seen, real = [], recipe.evaluate_model
    monkeypatch.setattr(recipe, "evaluate_model", lambda model, pack, tok, ex: seen.append(len(tok)) or real(
        model, pack, tok, ex))
    base_len = len(load_base(base_dir).tokenizer)
    main(["compose", "--lang", "sw", "--task", "ner", "--base", base_dir, "--eval-data", str(eval_file),
          "--output", str(workdir / "composed"), "--register"])
    assert seen == [base_len + 4, base_len]  # the composition with its new words; the English baseline without
    assert "zero-shot ner on sw" in capsys.readouterr().out
    composed = compose(base_dir, ["xlpeft-lang-sw-adapter", "xlpeft-task-ner-adapter"])
    again = compose(str(workdir / "composed"), [])  # the checkpoint, its unmerged modules and the saved tokenizer
    vocab = NewVocab.from_extra(again.xlpeft_active.entries[0][1].module.manifest.extra)
    assert len(again.xlpeft_tokenizer) == base_len + 4
    other = next(w for w in SW_WORDS if w not in vocab.tokens)  # a word the base's tokens spell
    enc = again.xlpeft_tokenizer(f"{vocab.tokens[0]} {other} {vocab.tokens[1]}", return_tensors="pt")
    assert (enc["input_ids"] >= base_len).sum() == 2
    with torch.no_grad():
        torch.testing.assert_close(again(**enc).logits, composed(**enc).logits, rtol=0, atol=1e-6)
    from xlpeft.mlflow import load_model

    registered = load_model("models:/xlpeft-ner-sw/1")  # the registered MLflow Model: its modules, composed again
    with torch.no_grad():
        torch.testing.assert_close(registered(**enc).logits, composed(**enc).logits, rtol=0, atol=1e-6)
    assert len(registered.xlpeft_tokenizer) == base_len + 4


def test_a_merged_delta_with_new_words_round_trips_through_a_composed_checkpoint(workdir, base_dirs, sw_corpus,
                                                                                   tmp_path):
    from xlpeft import compose
    from xlpeft.cli import main
    from xlpeft.composed import save_composed

    base_dir = str(base_dirs["tiny-xlmr"])
    main(["train-lang", "--lang", "sw", "--method", "sft", "--base", base_dir, "--corpus", str(sw_corpus),
          "--max-steps", "4", "--set", "max_seq_len=32", "--set", "num_params=500", "--set", "new_tokens=4",
          "--output", str(workdir / "lang")])
    model = compose(base_dir, [workdir / "lang"])
    out = save_composed(model, tmp_path / "composed", model.xlpeft_tokenizer)  # the delta merged, the rows beside it
    again = compose(str(out), [])
    vocab = NewVocab.from_extra(again.xlpeft_active.entries[0][1].module.manifest.extra)
    other = next(w for w in SW_WORDS if w not in vocab.tokens)
    enc = again.xlpeft_tokenizer(f"{other} {vocab.tokens[0]}", return_tensors="pt")
    assert (enc["input_ids"] >= vocab.first_id).sum() == 1
    with torch.no_grad():
        torch.testing.assert_close(again(**enc).logits, model(**enc).logits, rtol=0, atol=1e-6)


def test_a_base_with_more_embedding_rows_than_tokens_scores_the_new_words_right_after_its_tokens(base_dirs):
    """XLM-R checkpoints (e5-small: 250,037 rows, 250,002 tokens) have unused rows past the tokenizer's ids."""
    base = load_base(str(base_dirs["tiny-xlmr"]))
    model, tok = base.model, base.tokenizer
    model.resize_token_embeddings(len(tok) + 7)  # rows no token reaches
    vocab = _vocab(base)
    rows = rows_for(model, vocab)
    ext = extended_tokenizer(tok, vocab)
    enc = ext(f"{vocab.tokens[0]} {SW_WORDS[0]}", return_tensors="pt")
    applied = AppliedVocab(model, rows)
    with torch.no_grad():
        logits = model(**enc).logits  # (1, T, first + N): the unused rows' logits are cut
        emb_out = model.get_input_embeddings()(enc["input_ids"])
    applied.remove()
    assert logits.shape[-1] == len(tok) + len(vocab.tokens)
    where = enc["input_ids"][0] == vocab.first_id
    assert torch.equal(emb_out[0, where], rows.weight[:1])  # an id inside the embedding matrix still reads its new row


def test_the_matrix_scores_a_module_with_new_words_with_its_tokenizer_and_leaves_the_rest_in_place(
        workdir, base_dirs, sw_corpus, ner_files):
    from tests.conftest import make_ner
    from xlpeft import compose, load_module
    from xlpeft.cli import main
    from xlpeft.evaluation import evaluate_model
    from xlpeft.matrix import Scorer
    from xlpeft.packs import load_task_pack

    base_dir = str(base_dirs["tiny-bert"])
    lang = ["train-lang", "--lang", "sw", "--base", base_dir, "--corpus", str(sw_corpus), "--max-steps", "3",
            "--set", "max_seq_len=32"]
    main([*lang, "--set", "new_tokens=4", "--output", str(workdir / "vocab")])
    main([*lang, "--output", str(workdir / "plain")])
    main(["train-task", "--task", "ner", "--lang", "en", "--base", base_dir, "--train-data", str(ner_files["train"]),
          "--set", "lang_module=none", "--max-steps", "3", "--set", "max_seq_len=32", "--output", str(workdir / "ner")])
    vocab_mod, plain, task = (load_module(workdir / d) for d in ("vocab", "plain", "ner"))
    vocab = NewVocab.from_extra(vocab_mod.manifest.extra)
    pack = load_task_pack("ner")
    from tests.conftest import write_conll
    from xlpeft.evaluation import eval_examples

    sentences = [[*s, (vocab.tokens[i % 4], "O")] for i, s in enumerate(make_ner(12, seed=4))]  # new words in each
    examples, _ = eval_examples(pack, "sw", str(write_conll(workdir / "sw.conll", sentences)))
    base = load_base(base_dir)
    scorer = Scorer(base)
    data = scorer.prepare(pack, examples)
    first = scorer.score([plain, task], data)
    with_words = scorer.score([vocab_mod, task], data)
    again = scorer.score([plain, task], data)
    scorer.close()
    model = compose(base_dir, [vocab_mod, task])
    assert with_words == evaluate_model(model, pack, model.xlpeft_tokenizer, examples)["f1"]
    assert first == again  # the cell composed on its own left the in-place models as they were


def test_a_task_module_trained_over_new_words_reads_them_also_among_other_sources(
        workdir, base_dirs, sw_corpus, capsys, monkeypatch):
    import xlpeft.recipes.train_task as recipe
    from tests.conftest import write_conll
    from xlpeft.cli import main

    base_dir = str(base_dirs["tiny-bert"])
    lang = ["train-lang", "--base", base_dir, "--corpus", str(sw_corpus), "--max-steps", "2", "--set", "max_seq_len=32"]
    main([*lang, "--lang", "sw", "--set", "new_tokens=4", "--output", str(workdir / "sw")])
    main([*lang, "--lang", "en", "--output", str(workdir / "en")])
    vocab = NewVocab.from_extra(load_module(workdir / "sw").manifest.extra)
    data = write_conll(workdir / "sw.conll", [[(w, "O") for w in line.split()[:6]] + [("Juma", "B-PER")]
                                              for line in make_lines(SW_WORDS, 40, seed=6)])
    seen, real = [], recipe.encode
    monkeypatch.setattr(recipe, "encode", lambda pack, tok, *a, **k: seen.append(len(tok)) or real(pack, tok, *a, **k))
    task = ["train-task", "--task", "ner", "--base", base_dir, "--max-steps", "2", "--set", "max_seq_len=32"]
    main([*task, "--lang", "sw", "--train-data", str(data), "--set", f"lang_module={workdir / 'sw'}",
          "--output", str(workdir / "task")])
    assert seen and set(seen) == {vocab.first_id + len(vocab.tokens)}  # encoded with the module's new words
    seen.clear()
    main([*task, "--lang", "en,sw", "--train-data", f"{data},{data}",
          "--set", f"lang_module={workdir / 'en'},{workdir / 'sw'}", "--output", str(workdir / "multi")])
    assert sorted(set(seen)) == [vocab.first_id, vocab.first_id + len(vocab.tokens)]  # each source its own tokenizer
    assert load_module(workdir / "multi").manifest.kind == "task"


@pytest.mark.parametrize("method", ["adapter", "sft"])  # hooked, and merged into the weights per batch
def test_the_language_switch_gives_each_source_its_own_new_words(workdir, base_dirs, sw_corpus, method):
    """Two sources whose new ids are the same numbers: each batch meets only its own source's rows."""
    from xlpeft.cli import main
    from xlpeft.compose import activate
    from xlpeft.multisource import LanguageSwitch
    from xlpeft.vocab import tokenizer_for

    base_dir = str(base_dirs["tiny-bert"])
    en_corpus = workdir / "en.txt"
    en_corpus.write_text("\n".join(make_lines(EN_WORDS, 200, seed=3)) + "\n", encoding="utf-8")
    extra = ["--set", "num_params=300"] if method == "sft" else []
    for lang, corpus in (("en", en_corpus), ("sw", sw_corpus)):
        main(["train-lang", "--lang", lang, "--method", method, "--base", base_dir, "--corpus", str(corpus),
              "--max-steps", "3", "--set", "max_seq_len=32", "--set", "lr=1e-2", "--set", "new_tokens=4", *extra,
              "--output", str(workdir / lang)])
    base = load_base(base_dir)
    modules = {lang: load_module(workdir / lang) for lang in ("en", "sw")}
    vocabs = {lang: NewVocab.from_extra(m.manifest.extra) for lang, m in modules.items()}
    assert vocabs["en"].first_id == vocabs["sw"].first_id and vocabs["en"].tokens != vocabs["sw"].tokens
    plain = {lang: [w for w in (EN_WORDS if lang == "en" else SW_WORDS) if w not in vocabs[lang].tokens][:2]
             for lang in modules}
    enc = {lang: tokenizer_for(base.tokenizer, [m])(f"{plain[lang][0]} {vocabs[lang].tokens[0]} {plain[lang][1]}",
                                                     return_tensors="pt") for lang, m in modules.items()}
    assert all((e["input_ids"] >= vocabs["en"].first_id).sum() == 1 for e in enc.values())

    def hidden(batch):
        with torch.no_grad():
            return base.model.base_model(**batch).last_hidden_state

    expected = {}
    for lang, module in modules.items():
        active = activate(base, [module])
        expected[lang] = hidden(enc[lang])
        active.remove()
    theta0 = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    hooks0 = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.model.modules())
    switch = LanguageSwitch(base, modules, verify=True)
    try:
        for lang in ("sw", "en", "en", "sw", "en"):
            switch.to(lang)
            assert torch.equal(hidden(enc[lang]), expected[lang]), f"{method}: under {lang}"
    finally:
        switch.remove()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.model.modules()) == hooks0
    assert all(torch.equal(p, theta0[n]) for n, p in base.model.named_parameters())


def _glued(n: int = 200, seed: int = 3) -> list[str]:
    """Swahili words run together inside each phrase, as Khmer or Thai text runs its words together."""
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice(SW_WORDS) for _ in range(rng.randint(2, 4))) for _ in range(3))
            for _ in range(n)]


def _model_kind(tok) -> str:
    return json.loads(tok.backend_tokenizer.to_str())["model"]["type"]


def test_pieces_chosen_are_frequent_pieces_inside_words_that_the_base_splits(arch_base):
    tok, lines = arch_base.tokenizer, _glued()
    pieces, scores = select_pieces(lines, tok, 6, min_count=3)
    assert len(pieces) == 6 and select_pieces(lines, tok, 6, min_count=3) == (pieces, scores)  # deterministic
    known = tok.get_vocab()
    assert all(p not in known and len(base_ids(tok, p)) >= 2 for p in pieces)
    assert len(scores) == (6 if _model_kind(tok) == "Unigram" else 0)  # WordPiece has no scores
    assert select_pieces(lines, tok, 3, min_count=3)[0] == pieces[:3]  # the most frequent first
    assert select_pieces(lines, tok, 6, min_count=10**6) == ([], [])
    assert select_words(lines, tok, 6, min_count=3) == []  # no phrase repeats: whole words find nothing here


def test_a_piece_tokenizer_reads_the_pieces_inside_words_and_all_else_as_the_base(arch_base, tmp_path):
    from transformers import AutoTokenizer

    tok, lines = arch_base.tokenizer, _glued()
    pieces, scores = select_pieces(lines, tok, 6)
    vocab = NewVocab(tuple(pieces), len(tok), "piece", tuple(scores))
    before = tok(lines, add_special_tokens=False)["input_ids"]
    ext = extended_tokenizer(tok, vocab)
    assert len(tok) == vocab.first_id and len(ext) == vocab.first_id + 6  # the base's tokenizer is unchanged
    assert ext.convert_tokens_to_ids(pieces) == list(range(vocab.first_id, vocab.first_id + 6))
    ids = ext(lines, add_special_tokens=False)["input_ids"]
    assert sum(map(len, ids)) < sum(map(len, before)) and any(i >= vocab.first_id for row in ids for i in row)
    bare = [p.lstrip("▁").removeprefix("##") for p in pieces]
    elsewhere = [line for line in make_lines(EN_WORDS, 40, seed=4) if not any(b in line for b in bare)]
    assert elsewhere and ext(elsewhere)["input_ids"] == tok(elsewhere)["input_ids"]  # text without them: as before
    ext.save_pretrained(tmp_path / "tok")  # compose --output saves it so; it must read the same again
    assert AutoTokenizer.from_pretrained(tmp_path / "tok")(lines)["input_ids"] == ext(lines)["input_ids"]
    with pytest.raises(XlpeftError, match="another tokenizer"):
        extended_tokenizer(ext, vocab)
    rows = rows_for(arch_base.model, vocab)
    rows.init_from_pieces(arch_base.model, tok)
    emb = arch_base.model.get_input_embeddings().weight
    for i, piece in enumerate(pieces):  # each row starts as the mean of the base pieces it replaces
        torch.testing.assert_close(rows.weight[i], emb[base_ids(tok, piece)].mean(0), rtol=0, atol=1e-6)


def test_wordpiece_reading_of_a_piece_is_the_greedy_longest_match():
    from xlpeft.vocab.pieces import _wordpiece_ids

    vocab = {"[UNK]": 0, "ab": 1, "##c": 2, "##cd": 3, "##d": 4, "a": 5, "##b": 6}
    assert _wordpiece_ids("abcd", vocab, "##", 0) == [1, 3]
    assert _wordpiece_ids("##bcd", vocab, "##", 0) == [6, 3]  # a continuation piece reads as continuations
    assert _wordpiece_ids("abx", vocab, "##", 0) == [0]  # as WordPiece: not coverable, one unknown


def test_train_lang_with_new_pieces_trains_composes_and_round_trips_them(workdir, base_dirs, capsys, tmp_path):
    from xlpeft import compose
    from xlpeft.cli import main
    from xlpeft.composed import save_composed
    from xlpeft.hub_card import model_card

    corpus = workdir / "glued.txt"
    corpus.write_text("\n".join(_glued(300)) + "\n", encoding="utf-8")
    base_dir = str(base_dirs["tiny-xlmr"])
    common = ["train-lang", "--lang", "sw", "--base", base_dir, "--corpus", str(corpus), "--max-steps", "4",
              "--set", "max_seq_len=32", "--set", "lr=1e-2"]
    main([*common, "--set", "new_tokens=5", "--set", "new_token_unit=piece", "--output", str(workdir / "lang")])
    module = load_module(workdir / "lang")
    vocab = NewVocab.from_extra(module.manifest.extra)
    assert vocab.unit == "piece" and len(vocab.tokens) == len(vocab.scores) == 5
    assert "adds 5 sub-word pieces" in model_card(module, "org/sw-pieces")
    model = compose(base_dir, [workdir / "lang"])
    enc = model.xlpeft_tokenizer(_glued(4, seed=9), return_tensors="pt", padding=True)
    assert (enc["input_ids"] >= vocab.first_id).any()
    out = save_composed(model, tmp_path / "composed", model.xlpeft_tokenizer)
    again = compose(str(out), [])
    enc2 = again.xlpeft_tokenizer(_glued(4, seed=9), return_tensors="pt", padding=True)
    assert torch.equal(enc2["input_ids"], enc["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(again(**enc2).logits, model(**enc).logits, rtol=0, atol=1e-6)
    for sets, message in ((["--set", "new_token_unit=piece"], "new_tokens=N, which is 0"),
                          (["--set", "new_tokens=3", "--set", "new_token_unit=letters"], "should be one of word, piece")):
        with pytest.raises(SystemExit) as exit_info:
            main([*common, *sets, "--output", str(workdir / "bad")])
        assert exit_info.value.code != 0 and message in capsys.readouterr().err


def test_the_choice_is_made_once_per_process_and_said_once(arch_base, tmp_path, capsys, monkeypatch):
    """``xlpeft run`` plans a step (is it done?) and then runs it: the corpus is read and the shortfall said once."""
    import xlpeft.vocab as vocab_mod
    from xlpeft.data.corpora import CorpusSpec

    corpus = tmp_path / "glued.txt"
    corpus.write_text("\n".join(_glued()) + "\n", encoding="utf-8")
    monkeypatch.setattr(vocab_mod, "_PLANNED", {})
    calls, real = [], vocab_mod._choose
    monkeypatch.setattr(vocab_mod, "_choose", lambda *a: calls.append(a) or real(*a))
    specs = [CorpusSpec(path=str(corpus))]
    first = vocab_mod.plan_new_vocab(specs, arch_base.tokenizer, 500, 3, "piece")
    again = vocab_mod.plan_new_vocab(specs, arch_base.tokenizer, 500, 3, "piece")
    assert first is again and len(calls) == 1 and len(first.tokens) < 500
    assert capsys.readouterr().err.count("of the 500 asked for") == 1
    other = vocab_mod.plan_new_vocab(specs, arch_base.tokenizer, 2, 3, "piece")  # another request: chosen anew
    assert len(calls) == 2 and len(other.tokens) == 2


def test_an_ensemble_of_members_with_new_words_reads_each_through_its_tokenizer_and_mixes_per_word(
        workdir, base_dirs, sw_corpus, ner_files, capsys):
    from tests.conftest import make_ner, write_conll
    from xlpeft import compose
    from xlpeft.cli import main
    from xlpeft.compose import ModuleRef
    from xlpeft.data.tasks import NO_SUBWORD
    from xlpeft.ensemble import EnsembleConfig, build_ensemble
    from xlpeft.evaluation import encode, eval_examples, model_max_len, predict_model
    from xlpeft.packs import load_task_pack

    base_dir = str(base_dirs["tiny-bert"])
    en_corpus = workdir / "en.txt"
    en_corpus.write_text("\n".join(make_lines(EN_WORDS, 200, seed=3)) + "\n", encoding="utf-8")
    for lang, corpus in (("sw", sw_corpus), ("en", en_corpus)):
        main(["train-lang", "--lang", lang, "--base", base_dir, "--corpus", str(corpus), "--max-steps", "3",
              "--set", "max_seq_len=32", "--set", "lr=1e-2", "--set", "new_tokens=4", "--output", str(workdir / lang)])
    main(["train-task", "--task", "ner", "--lang", "en", "--base", base_dir, "--train-data", str(ner_files["train"]),
          "--set", "lang_module=none", "--max-steps", "6", "--set", "max_seq_len=32", "--set", "lr=3e-3",
          "--output", str(workdir / "ner")])
    sw, en, task = (ModuleRef.of(load_module(workdir / d)) for d in ("sw", "en", "ner"))
    vocabs = [NewVocab.from_extra(m.module.manifest.extra) for m in (sw, en)]
    sentences = [[*s, (vocabs[0].tokens[i % 4], "O"), (vocabs[1].tokens[i % 4], "O")]
                 for i, s in enumerate(make_ner(12, seed=4))]  # both members' new words in every sentence
    test_file = write_conll(workdir / "yo.conll", sentences)
    pack = load_task_pack("ner")
    examples, _ = eval_examples(pack, "yo", str(test_file))
    base = load_base(base_dir)
    singles = [compose(base_dir, [m.module, task.module]) for m in (sw, en)]
    one = build_ensemble(base, [sw], task)
    assert one.predict(pack, examples) == predict_model(singles[0], pack, singles[0].xlpeft_tokenizer, examples)

    two = build_ensemble(base, [sw, en], task)
    assert not two.shared_tokenizer
    expected = []  # by hand: each member on each sentence alone, its words' distributions averaged
    for ex in examples:
        mixed = 0
        for model in singles:
            enc = encode(pack, model.xlpeft_tokenizer, [ex], model_max_len(model))
            with torch.no_grad():
                probs = model(input_ids=torch.tensor(enc.input_ids)).logits.softmax(-1)[0]  # (T, C)
            assert all(p != NO_SUBWORD for p in enc.words[0])
            mixed = mixed + 0.5 * probs[enc.words[0]]  # (W, C)
        expected.append([pack.labels[i] for i in mixed.argmax(-1).tolist()])
    assert two.predict(pack, examples) == expected
    with pytest.raises(XlpeftError, match="Ensemble.predict"):
        two(**singles[0].xlpeft_tokenizer("watu", return_tensors="pt"))
    emea = build_ensemble(base, [sw, en], task, EnsembleConfig(emea_steps=3))
    assert len(emea.predict(pack, examples)) == len(examples) and abs(float(emea.last_weights.sum()) - 1) < 1e-6
    main(["compose", "--lang", "yo", "--task", "ner", "--base", base_dir, "--ensemble", "sw,en", "--emea",
          "--eval-data", str(test_file)])
    assert "through an ensemble of sw, en" in capsys.readouterr().out


def test_a_bpe_base_is_refused_with_the_way_out():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(make_lines(SW_WORDS, 50), trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>")
    with pytest.raises(XlpeftError, match="this base's is BPE; use --set new_token_unit=word"):
        select_pieces(_glued(), tok, 4)
