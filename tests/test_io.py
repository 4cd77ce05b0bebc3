import json

import pytest
import torch

from xlpeft.errors import XlpeftError
from xlpeft.io import Manifest, load_module, save_module


def _manifest(**kw):
    return Manifest(kind="language", method="adapter", lang="sw",
                    base={"name": "b", "fingerprint": "abc", "model_type": "bert"}, config={}, **kw)


def test_round_trip(tmp_path):
    tensors = {"adapter": {"w": torch.randn(3, 4), "b": torch.zeros(4)}}
    path = save_module(tmp_path / "m", _manifest(trainable_parameters=16), tensors)
    loaded = load_module(path)
    assert loaded.manifest.files == ["adapter.safetensors"]
    assert loaded.manifest.trainable_parameters == 16
    torch.testing.assert_close(loaded.tensors["adapter"]["w"], tensors["adapter"]["w"], rtol=0, atol=0)
    assert not list(tmp_path.glob(".m.tmp-*")), "no temporary directory left behind"


def test_overwrite_is_atomic_replacement(tmp_path):
    save_module(tmp_path / "m", _manifest(), {"adapter": {"w": torch.ones(2)}})
    save_module(tmp_path / "m", _manifest(), {"adapter": {"w": torch.zeros(2)}})
    assert load_module(tmp_path / "m").tensors["adapter"]["w"].sum() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_base_fingerprint_mismatch_is_refused(tmp_path):
    loaded = load_module(save_module(tmp_path / "m", _manifest(), {"adapter": {"w": torch.ones(2)}}))
    loaded.check_base("abc")
    with pytest.raises(XlpeftError, match="fingerprint abc.*fingerprint zzz"):
        loaded.check_base("zzz")
    loaded.check_base("zzz", force=True)


def test_manifest_paths_cannot_escape(tmp_path):
    path = save_module(tmp_path / "m", _manifest(), {"adapter": {"w": torch.ones(2)}})
    raw = json.loads((path / "xlpeft.json").read_text())
    raw["files"] = ["../evil.safetensors"]
    (path / "xlpeft.json").write_text(json.dumps(raw))
    with pytest.raises(XlpeftError, match="outside the module"):
        load_module(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(XlpeftError, match="no xlpeft.json"):
        load_module(tmp_path)
    path = save_module(tmp_path / "m", _manifest(), {"adapter": {"w": torch.ones(100)}})
    data = (path / "adapter.safetensors").read_bytes()
    (path / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(XlpeftError, match="corrupted"):
        load_module(path)


def test_unknown_format_version(tmp_path):
    path = save_module(tmp_path / "m", _manifest(), {"adapter": {"w": torch.ones(2)}})
    raw = json.loads((path / "xlpeft.json").read_text())
    raw["format_version"] = 99
    (path / "xlpeft.json").write_text(json.dumps(raw))
    with pytest.raises(XlpeftError, match="format_version 99"):
        load_module(path)


# ---- the --output policy and the clean-up of temporaries (issue 15)


def test_save_module_never_replaces_what_is_not_a_module(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(XlpeftError, match="not an xlpeft module"):
        save_module(mine, _manifest(), {"adapter": {"w": torch.zeros(1)}})
    assert (mine / "thesis.tex").read_text() == "years of work"
    first = save_module(tmp_path / "m", _manifest(), {"adapter": {"w": torch.zeros(1)}})
    save_module(first, _manifest(), {"adapter": {"w": torch.ones(1)}})  # an earlier module: replaced
    assert load_module(first).tensors["adapter"]["w"].item() == 1.0


def test_check_module_output_kinds(tmp_path):
    from dataclasses import replace

    from xlpeft.io import check_module_output

    out = save_module(tmp_path / "task", replace(_manifest(), kind="task"), {"adapter": {"w": torch.zeros(1)}})
    with pytest.raises(XlpeftError, match="task module.*--overwrite"):
        check_module_output(out, "language")
    assert check_module_output(out, "language", overwrite=True) == out.resolve()
    assert check_module_output(out, "task") == out.resolve()
    with pytest.raises(XlpeftError, match="existing file"):
        (tmp_path / "f").write_text("x")
        check_module_output(tmp_path / "f", "task", overwrite=True)


def test_clean_stale_keeps_live_processes_temporaries(tmp_path):
    import os

    from xlpeft.io import clean_stale

    live = tmp_path / f".m.tmp-{os.getpid()}-x"
    dead = tmp_path / f".m.tmp-{2**22 + 12345}-x"
    other = tmp_path / f".n.tmp-{2**22 + 12345}-x"
    for d in (live, dead, other):
        d.mkdir()
    clean_stale(tmp_path, ".m.tmp-")
    assert live.exists() and not dead.exists() and other.exists()
