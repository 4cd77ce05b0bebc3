"""max_seq_len against the base's position table (issue 14, defect 2): defaults fit, explicit values that do
not are one error line before any run, long task sentences are cut with a warning instead of crashing."""

import json

import pytest

from tests.conftest import make_ner, write_conll
from tests.test_cli import assert_nothing_tracked, assert_one_error_line
from xlpeft.cli import main
from xlpeft.models import fit_seq_len, load_base, usable_positions


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one CLI call, whether or not it exits."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def short_bases(base_dirs, tmp_path_factory):
    """The tiny bases with a 64-position table: BERT max_position_embeddings=64, XLM-R 66 (= 64 + padding_idx + 1)."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    out = {}
    for kind, table in (("tiny-bert", 64), ("tiny-xlmr", 66)):
        target = tmp_path_factory.mktemp(f"short-{kind}")
        config = AutoConfig.from_pretrained(base_dirs[kind])
        config.max_position_embeddings = table
        AutoModelForMaskedLM.from_config(config).save_pretrained(target)
        AutoTokenizer.from_pretrained(base_dirs[kind]).save_pretrained(target)
        out[kind] = target
    return out


def test_usable_positions_counts_xlmr_offset(base_dirs, short_bases):
    assert usable_positions(load_base(str(base_dirs["tiny-bert"])).model) == 514
    assert usable_positions(load_base(str(base_dirs["tiny-xlmr"])).model) == 512  # 514 - padding_idx(1) - 1
    for kind in short_bases:
        model = load_base(str(short_bases[kind])).model
        assert usable_positions(model) == 64
        assert fit_seq_len(256, model, explicit=False) == 64
        assert fit_seq_len(64, model, explicit=True) == 64


@pytest.mark.parametrize("kind", ["tiny-bert", "tiny-xlmr"])
def test_default_max_seq_len_fits_the_base(capsys, workdir, short_bases, sw_corpus, kind):
    """The default 256 on a 64-position base used to die with `The expanded size of the tensor (256)`."""
    code, out, err = run_cli(capsys, "train-lang", "--lang", "sw", "--base", str(short_bases[kind]),
                             "--corpus", str(sw_corpus), "--max-steps", "2", "--batch-size", "2")
    assert code == 0, err
    assert "max_seq_len: 64" in err
    manifest = json.loads((workdir / "modules/lang-sw-adapter/xlpeft.json").read_text())
    assert manifest["training"]["train"]["max_seq_len"] == 64


def test_explicit_max_seq_len_too_long_is_one_error_before_any_run(capsys, workdir, short_bases, sw_corpus):
    code, _, err = run_cli(capsys, "train-lang", "--lang", "sw", "--base", str(short_bases["tiny-xlmr"]),
                           "--corpus", str(sw_corpus), "--max-steps", "2", "--set", "max_seq_len=100")
    assert_one_error_line(code, err, "max_seq_len=100", "64 usable positions", "max_seq_len=64")
    assert_nothing_tracked(workdir)


def test_task_training_and_eval_cut_long_sentences(capsys, workdir, short_bases, tmp_path):
    """Sentences of ~90 sub-words on a 64-position base: trained and scored (cut, with a count), never a crash."""
    long = [[("Amina", "B-PER")] + [("jana", "O")] * 90 + [("Nairobi", "B-LOC")]] * 3
    train = write_conll(tmp_path / "train.conll", make_ner(40, seed=1) + long)
    dev = write_conll(tmp_path / "dev.conll", make_ner(10, seed=2) + long[:1])
    with pytest.warns(UserWarning, match="longer than max_seq_len=64") as caught:
        code, _, err = run_cli(capsys, "train-task", "--task", "ner", "--lang", "en", "--base",
                               str(short_bases["tiny-bert"]), "--train-data", str(train), "--eval-data", str(dev),
                               "--max-steps", "2", "--batch-size", "4", "--set", "lang_module=none")
    assert code == 0, err
    assert "max_seq_len: 64" in err
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("training data: 3 of 43") and "not trained on" in m for m in messages), messages
    assert any(m.startswith("evaluation: 1 of 11") and "scored as 'O'" in m for m in messages), messages

