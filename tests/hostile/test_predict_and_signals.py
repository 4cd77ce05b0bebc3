"""Issue 15: predict keeps one output block per input line and never emits invisible characters;
SIGTERM ends the MLflow run (not RUNNING) and keeps the checkpoint, as Ctrl-C does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

INVISIBLE = ["\u200b", "\u200d", "\u200f", "\u00ad", "\ufeff", "\u2066", "\u2069", "\u200e"]


@pytest.mark.parametrize("ch", INVISIBLE)
def test_word_splitter_drops_invisible_characters(ch):
    from xlpeft.data.text import tokenize_words

    words = tokenize_words(f"Juma{ch} alikwenda {ch} Nairobi{ch}.")
    assert words == ["Juma", "alikwenda", "Nairobi", "."], words


@pytest.mark.parametrize("line, words", [
    ("नमस्ते दुनिया!", ["नमस्ते", "दुनिया", "!"]),  # Devanagari vowel signs and virama (Mc, Mn)
    ("ការអប់រំ គឺជាសិទ្ធិ។", ["ការអប់រំ", "គឺជាសិទ្ធិ", "។"]),  # Khmer vowels and coeng; no spaces inside phrases
    ("مَرْحَبًا بِكُمْ", ["مَرْحَبًا", "بِكُمْ"]),  # Arabic harakat
    ("Ẹ kú àárọ̀, ọ̀rẹ́", ["Ẹ", "kú", "àárọ̀", ",", "ọ̀rẹ́"]),  # Yoruba with combining tone marks
    ("don't stop-gap", ["don't", "stop-gap"]),
])
def test_word_splitter_keeps_combining_marks_inside_their_words(line, words):
    """Python's \\w leaves out combining marks: words of Indic, Khmer, Arabic or decomposed Latin text fell apart."""
    from xlpeft.data.text import tokenize_words

    assert tokenize_words(line) == words


def test_predict_output_blocks_match_input_lines(capsys, monkeypatch):
    import io

    import xlpeft.recipes.predict as rc
    from xlpeft.cli import main
    from xlpeft.data.tasks import TokenExample
    from xlpeft.data.text import tokenize_words

    def fake_predict_lines(lang, task, base, lines, lang_method=None, task_method=None):
        out = []
        for line in lines:
            words = tuple(tokenize_words(line))
            out.append((TokenExample(words, ("O",) * len(words)), ["O"] * len(words)))
        return out

    monkeypatch.setattr(rc, "predict_lines", fake_predict_lines)
    monkeypatch.setattr("sys.stdin", io.StringIO("Juma alikwenda\n\n\u200b\nNairobi\n"))
    main(["predict", "--lang", "sw", "--task", "ner", "--base", "tiny-bert"])  # returns: exit 0
    blocks = capsys.readouterr().out.split("\n\n")
    assert blocks[:4] == ["Juma\tO\nalikwenda\tO", "", "", "Nairobi\tO"], blocks


@pytest.mark.slow
def test_sigterm_marks_the_run_and_keeps_the_checkpoint(workdir, base_dirs, sw_corpus):
    from xlpeft import tracking

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "xlpeft", "train-lang", "--lang", "sw", "--base", str(base_dirs["tiny-bert"]),
           "--corpus", str(sw_corpus), "--max-steps", "100000", "--set", "max_seq_len=32",
           "--set", "checkpoint_every=2", "--output", str(workdir / "modules" / "sw")]
    proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(workdir.glob("modules/.checkpoints/*/checkpoint.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--resume" in errors[0], err[-2000:]
    c = tracking.client()
    statuses = [r.info.status for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]
    assert statuses and "RUNNING" not in statuses, statuses
    assert list(workdir.glob("modules/.checkpoints/*/checkpoint.safetensors"))
