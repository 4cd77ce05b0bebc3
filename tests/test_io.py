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
