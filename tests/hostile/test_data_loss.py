"""Issue 15, data loss: --output never deletes what is not an earlier xlpeft module of the same kind;
nothing non-finite is saved, registered or loaded; JSONL labels are not silently mapped; a resume
on a rewritten corpus is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.hostile.conftest import interrupt_after_checkpoint, lang_args, task_args


def _user_dir(root: Path) -> Path:
    d = root / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work\n", encoding="utf-8")
    return d


@pytest.mark.parametrize("where", ["user-dir", "dot", "workdir-abs", "file", "ancestor"])
def test_train_lang_output_never_deletes_user_data(capsys, store, tiny, corpus, where):
    root = store.root
    target = {"user-dir": lambda: _user_dir(root), "dot": lambda: ".", "workdir-abs": lambda: root,
              "file": lambda: root / "notes.txt", "ancestor": lambda: root.parent}[where]()
    outcome = store.run(capsys, *lang_args(tiny, corpus, "--output", target))
    store.refused(outcome, "--output")
    assert (root / "notes.txt").read_text(encoding="utf-8") == "the user's own file\n"


def test_train_task_output_on_user_dir_refused(capsys, store, tiny, ner):
    target = _user_dir(store.root)
    store.refused(store.run(capsys, *task_args(tiny, ner, "--output", target)), "--output", "not an xlpeft module")


def test_module_of_another_kind_needs_overwrite(capsys, store, tiny, corpus, ner):
    task_dir = store.root / "modules" / "task"
    first = store.run(capsys, *task_args(tiny, ner, "--output", task_dir))
    assert first.code == 0, first.err[-2000:]
    store.refused(store.run(capsys, *lang_args(tiny, corpus, "--output", task_dir)), "task module", "--overwrite")
    again = store.run(capsys, *lang_args(tiny, corpus, "--output", task_dir, "--overwrite"))
    assert again.code == 0, again.err[-2000:]
    assert json.loads((task_dir / "xlpeft.json").read_text())["kind"] == "language"


def test_earlier_module_of_same_kind_is_replaced(capsys, store, tiny, corpus):
    out = store.root / "modules" / "sw"
    assert store.run(capsys, *lang_args(tiny, corpus, "--output", out)).code == 0
    second = store.run(capsys, *lang_args(tiny, corpus, "--output", out, "--seed", "3"))
    assert second.code == 0, second.err[-2000:]
    assert json.loads((out / "xlpeft.json").read_text())["training"]["seed"] == 3


def test_compose_output_never_overwrites_another_model(capsys, store, tiny, corpus, ner):
    assert store.run(capsys, *lang_args(tiny, corpus)).code == 0
    assert store.run(capsys, *task_args(tiny, ner)).code == 0
    other = store.root / "other-model"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    (other / "model.safetensors").write_bytes(b"not mine to overwrite")
    outcome = store.run(capsys, "compose", "--lang", "sw", "--task", "ner", "--base", tiny, "--eval-data", ner["eval"],
                        "--output", other)
    store.refused(outcome, "--output", "other-model")
    assert (other / "model.safetensors").read_bytes() == b"not mine to overwrite"


def test_nonfinite_loss_stops_training_and_registers_nothing(capsys, store, tiny, corpus):
    out = store.root / "modules" / "nan"
    outcome = store.run(capsys, *lang_args(tiny, corpus, "--output", out, "--set", "lr=1e30", "--max-steps", "6"))
    store.refused(outcome, "non-finite", "step", runs="failed")
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nonfinite_lr_refused_before_training(capsys, store, tiny, corpus, value):
    store.refused(store.run(capsys, *lang_args(tiny, corpus, "--set", f"lr={value}")), "lr", "finite")


def _nan_language_module(root: Path, tiny: str) -> Path:
    from xlpeft.io import Manifest, save_module
    from xlpeft.models import fingerprint_dir

    good = root / "good-lang"
    manifest = Manifest(kind="language", method="adapter", lang="sw", config={},
                        base={"name": tiny, "fingerprint": fingerprint_dir(Path(tiny)), "model_type": "bert"})
    save_module(good, manifest, {"adapter": {"w": torch.zeros(2, 2)}})
    from safetensors.torch import save_file

    save_file({"w": torch.full((2, 2), float("nan"))}, str(good / "adapter.safetensors"))
    return good


def test_module_with_nonfinite_weights_refused(capsys, store, tiny, ner):
    bad = _nan_language_module(store.root, tiny)
    outcome = store.run(capsys, *task_args(tiny, ner)[:-4], "--set", f"lang_module={bad}", "--set", "max_seq_len=32")
    store.refused(outcome, "non-finite")


def test_nonfinite_weights_never_overwrite_the_last_good_checkpoint(tmp_path):
    from xlpeft.checkpoint import CHECKPOINT, save_checkpoint
    from xlpeft.errors import XlpeftError

    save_checkpoint(tmp_path, {"trainable.w": torch.ones(2)}, {"done": 2})
    good = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(XlpeftError, match="non-finite.*step 4"):
        save_checkpoint(tmp_path, {"trainable.w": torch.tensor([1.0, float("nan")])}, {"done": 4})
    assert (tmp_path / CHECKPOINT).read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]


def test_nonfinite_module_is_never_saved(tmp_path):
    from xlpeft.errors import XlpeftError
    from xlpeft.io import Manifest, save_module

    manifest = Manifest(kind="language", method="adapter", config={}, base={"name": "b", "fingerprint": "f"})
    with pytest.raises(XlpeftError, match="non-finite"):
        save_module(tmp_path / "m", manifest, {"adapter": {"w": torch.tensor([1.0, float("inf")])}})
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("row, needle", [
    ({"premise": "a", "hypothesis": "b", "label": True}, "label"),
    ({"premise": None, "hypothesis": "b", "label": 0}, "premise"),
    ({"premise": ["a", "b"], "hypothesis": "b", "label": 0}, "premise"),
    ({"premise": "a", "hypothesis": "b", "label": 7}, "label"),
    ({"premise": "a", "hypothesis": "b", "label": 1.5}, "label"),
])
def test_jsonl_wrong_types_refused_with_line_number(capsys, store, tiny, row, needle):
    path = store.root / "nli.jsonl"
    good = {"premise": "x", "hypothesis": "y", "label": 0}
    path.write_text("\n".join(json.dumps(r) for r in (good, good, row, good)) + "\n", encoding="utf-8")
    outcome = store.run(capsys, "train-task", "--task", "nli", "--base", tiny, "--train-data", path,
                        "--max-steps", "2", "--set", "lang_module=none")
    store.refused(outcome, "nli.jsonl:3", needle)


def test_jsonl_minus_one_is_skipped_with_a_count(tmp_path, capsys):
    from xlpeft.data.tasks import read_jsonl

    path = tmp_path / "x.jsonl"
    rows = [{"premise": "a", "hypothesis": "b", "label": -1}, {"premise": "a", "hypothesis": "b", "label": 2},
            {"premise": "c", "hypothesis": "d", "label": -1}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    examples = read_jsonl(path, ["entailment", "neutral", "contradiction"])
    assert [e.label for e in examples] == ["contradiction"]
    assert "skipped 2" in capsys.readouterr().err


def test_resume_on_rewritten_corpus_refused(capsys, store, tiny, corpus, monkeypatch):
    restore = interrupt_after_checkpoint(monkeypatch)
    args = lang_args(tiny, corpus, "--max-steps", "4", "--set", "checkpoint_every=2")
    first = store.run(capsys, *args)
    assert first.code == 130, first.err[-2000:]
    restore()
    lines = corpus.read_text(encoding="utf-8").splitlines()
    corpus.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")  # same size and blocks, other order
    store.refused(store.run(capsys, *args, "--resume"), "corpus", "changed")
