"""Base fingerprints: identity of the weights, not of the directory; memoised, never stale."""

from __future__ import annotations

import os
import shutil

from safetensors.torch import load_file, save_file

from xlpeft.models import cache_dir, fingerprint_dir


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_copy_elsewhere_keeps_the_fingerprint(base_dirs, tmp_path):
    src = base_dirs["tiny-bert"]
    assert fingerprint_dir(_copy(src, tmp_path / "copy")) == fingerprint_dir(src)


def test_other_architecture_has_another_fingerprint(base_dirs):
    assert fingerprint_dir(base_dirs["tiny-bert"]) != fingerprint_dir(base_dirs["tiny-xlmr"])


def test_second_call_is_served_from_the_memo(base_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("XLPEFT_CACHE", str(tmp_path / "cache"))
    first = fingerprint_dir(base_dirs["tiny-bert"])
    memos = list((cache_dir() / "fingerprints").iterdir())
    assert len(memos) == 1 and memos[0].read_text() == first
    memos[0].write_text("0123456789abcdef")  # proves the memo, not a re-hash, answers
    assert fingerprint_dir(base_dirs["tiny-bert"]) == "0123456789abcdef"


def test_changed_weights_are_hashed_again(base_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("XLPEFT_CACHE", str(tmp_path / "cache"))
    model_dir = _copy(base_dirs["tiny-bert"], tmp_path / "model")
    before = fingerprint_dir(model_dir)
    weights = model_dir / "model.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1.0
    save_file(state, weights)
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock must not hide the edit
    assert fingerprint_dir(model_dir) != before


def test_unwritable_cache_still_fingerprints(base_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("XLPEFT_CACHE", str(tmp_path / "good"))
    expected = fingerprint_dir(base_dirs["tiny-bert"])
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("XLPEFT_CACHE", str(blocker))  # mkdir under a file fails: no memo, same answer
    assert fingerprint_dir(base_dirs["tiny-bert"]) == expected
