"""Pickles are only read with weights_only=True (a malicious one is refused, never run); `xlpeft convert` at the CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.interop.conftest import FIXTURES, base_dir
from tests.test_cli import assert_one_error_line, run_cli
from xlpeft.cli import main
from xlpeft.errors import XlpeftError
from xlpeft.interop import convert
from xlpeft.io import load_module


class Payload:
    """Unpickling this would run code: it reduces to exec(...) writing a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("fmt, case, filename", [
    ("adapterhub", "seq_bn", "pytorch_adapter.bin"),
    ("adapterhub", "ner_seq_bn", "pytorch_model_head.bin"),
    ("composable_sft", "lang_bert_diffs", "pytorch_diff.bin"),
])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, fmt, case, filename):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / fmt / case, src)
    marker = tmp_path / "marker"
    torch.save({"weights": Payload(marker)}, src / filename)
    with pytest.raises(XlpeftError) as info:
        convert(src, tmp_path / "out", fmt.replace("_", "-"), base=base_dir("tiny-bert"))
    assert "weights_only=True" in str(info.value) and "Unsupported global: GLOBAL exec" in str(info.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_torch_load_is_only_called_with_weights_only(monkeypatch, tmp_path):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for fmt, case in (("adapterhub", "seq_bn"), ("adapterhub", "ner_seq_bn"), ("composable_sft", "lang_bert_diffs"),
                      ("composable_sft", "lang_bert_body")):
        convert(FIXTURES / fmt / case, tmp_path / case, fmt.replace("_", "-"), base=base_dir("tiny-bert"))
    assert len(calls) == 5 and all(c is True for c in calls), calls
    source = "\n".join(p.read_text() for p in (Path(__file__).parents[2] / "xlpeft" / "interop").glob("*.py"))
    loads = re.findall(r"torch\.load\([^)]*\)", source)
    assert loads and all("weights_only=True" in call for call in loads), loads


def ok(capsys, *args) -> str:
    main(list(args))  # returns normally on success
    out, err = capsys.readouterr()
    assert not err.strip(), err
    return out


def test_cli_convert_round_trip(capsys, tmp_path):
    src, module, back = FIXTURES / "adapterhub" / "ner_seq_bn", tmp_path / "ner", tmp_path / "ner-ah"
    out = ok(capsys, "convert", str(src), str(module), "--from", "adapterhub", "--base", base_dir("tiny-bert"))
    assert f"-> {module} (xlpeft)" in out
    assert load_module(module).manifest.task == "ner"
    out = ok(capsys, "convert", str(module), str(back), "--from", "xlpeft", "--to", "adapterhub", "--name", "ner2")
    assert f"-> {back} (adapterhub)" in out
    assert json.loads((back / "adapter_config.json").read_text())["name"] == "ner2"
    ok(capsys, "convert", str(FIXTURES / "composable_sft" / "lang_bert_diffs"), str(tmp_path / "s"),
       "--from", "composable-sft", "--base", base_dir("tiny-bert"), "--without-head")
    assert load_module(tmp_path / "s").manifest.extra["dense_params"] == []


def test_cli_bad_input_is_one_error_line(capsys, tmp_path):
    src = FIXTURES / "adapterhub" / "seq_bn"
    code, _, err = run_cli(capsys, "convert", str(src), str(tmp_path / "a"), "--from", "adapterhub")
    assert_one_error_line(code, err, "needs --base")
    prompt = tmp_path / "prompt"  # an AdapterHub method xlpeft does not convert (lora is converted since issue 18)
    prompt.mkdir()
    (prompt / "adapter_config.json").write_text(json.dumps(
        {"config": {"architecture": "prompt_tuning", "prompt_length": 10}, "name": "x"}))
    code, _, err = run_cli(capsys, "convert", str(prompt), str(tmp_path / "b"), "--from", "adapterhub", "--base",
                           base_dir("tiny-bert"))
    assert_one_error_line(code, err, "'prompt_tuning'", "not supported")
    code, _, err = run_cli(capsys, "convert", str(src), str(tmp_path / "c"), "--from", "adapterhub", "--to", "composable-sft")
    assert_one_error_line(code, err, "between xlpeft and a foreign format")
    code, _, err = run_cli(capsys, "convert", str(src), str(tmp_path / "d"), "--from", "safetensors")
    assert_one_error_line(code, err, "--from")


def test_a_directory_that_is_not_an_earlier_output_is_never_replaced(tmp_path):
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(XlpeftError, match="not an earlier output"):
        convert(FIXTURES / "adapterhub" / "seq_bn", keep, "adapterhub", base=base_dir("tiny-bert"))
    module = convert(FIXTURES / "adapterhub" / "seq_bn", tmp_path / "m", "adapterhub", base=base_dir("tiny-bert"))
    with pytest.raises(XlpeftError, match="not an earlier output"):
        convert(module, keep, "xlpeft", "adapterhub")
    assert (keep / "notes.txt").read_text() == "mine"
    convert(FIXTURES / "adapterhub" / "seq_bn", module, "adapterhub", base=base_dir("tiny-bert"))  # replacing is fine
