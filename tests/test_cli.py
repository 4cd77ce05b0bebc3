"""Bad input through the CLI: one `Error:` line, non-zero exit, no traceback, nothing in MLflow."""

import subprocess
import sys
from pathlib import Path

import pytest

from xlpeft.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_error_line(code, err, *needles):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("Error:")]
    assert len(error_lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]


def assert_nothing_tracked(workdir: Path):
    from xlpeft import tracking

    if not (workdir / "mlflow.db").exists():
        return
    client = tracking.client()
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs == []
    assert tracking.list_registered() == []


@pytest.fixture
def tiny(base_dirs):
    return str(base_dirs["tiny-bert"])


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--corpus", "missing.txt"], ["missing.txt", "does not exist"]),
        (["--corpus", "empty.txt"], ["empty"]),
        (["--corpus", "binary.bin"], ["binary"]),
        (["--corpus", "latin1.txt"], ["not UTF-8"]),
        (["--set", "reduction=2"], ["unknown --set key", "reduction_factor"]),
        (["--set", "lr=fast"], ["`lr` should be a float", "'fast'"]),
        (["--set", "reduction_factor=-1"], ["reduction_factor", "> 0"]),
        (["--set", "placement=middle"], ["placement", "pfeiffer, houlsby"]),
        (["--set", "lr"], ["key=value"]),
        (["--method", "nosuch"], ["unknown method 'nosuch'", "adapter", "lora"]),
    ],
)
def test_bad_train_lang_input(capsys, workdir, tiny, sw_corpus, extra, needles):
    (workdir / "empty.txt").write_text("\n\n", encoding="utf-8")
    (workdir / "binary.bin").write_bytes(b"\x00\xff\x00abc")
    (workdir / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    corpus = [] if "--corpus" in extra else ["--corpus", str(sw_corpus)]
    args = ["train-lang", "--lang", "sw", "--base", tiny, "--max-steps", "2", *corpus, *extra]
    code, _, err = run_cli(capsys, *args)
    assert_one_error_line(code, err, *needles)
    assert_nothing_tracked(workdir)


@pytest.mark.parametrize(
    "method, key_value, needles",
    [
        ("lora", "r=0", ["r"]),
        ("lora", "alpha=-1", ["alpha"]),
        ("lora", "dropout=1.5", ["dropout"]),
        ("lora", "target_modules=gate", ["gate", "query"]),
        ("lora", "layers=7", ["layers", "7"]),  # the tiny base has 2: checked against the base before a run opens
        ("ia3", "target_modules=query", ["query", "key"]),
        ("prefix", "prefix_length=0", ["prefix_length"]),
        ("prefix", "width=0", ["width"]),
        ("prefix", "layers=middle", ["layers", "all"]),
        ("compacter", "phm_dim=0", ["phm_dim"]),
        ("compacter", "phm_dim=5", ["phm_dim", "divide"]),  # needs the base's hidden size (32)
        ("parallel", "scaling=-1", ["scaling"]),
        ("parallel", "placement=middle", ["placement", "ffn"]),
        ("mam", "prefix_length=0", ["prefix_length"]),
        ("adapter", "adapter_drop=9", ["adapter_drop"]),  # at most layers - 1
    ],
)
def test_bad_method_settings_are_one_error_line(capsys, workdir, tiny, sw_corpus, method, key_value, needles):
    """Every method's bad --set values: one Error: line naming the key, nothing tracked."""
    code, _, err = run_cli(capsys, "train-lang", "--lang", "sw", "--base", tiny, "--max-steps", "2", "--corpus",
                           str(sw_corpus), "--method", method, "--set", key_value)
    assert_one_error_line(code, err, *needles)
    assert_nothing_tracked(workdir)


def test_unknown_language(capsys, workdir, tiny):
    code, _, err = run_cli(capsys, "train-lang", "--lang", "xx", "--base", tiny)
    assert_one_error_line(code, err, "'xx' is not an ISO 639 language code", "language packs available:", "sw")
    assert_nothing_tracked(workdir)


def test_missing_base(capsys, workdir, sw_corpus):
    code, _, err = run_cli(capsys, "train-lang", "--lang", "sw", "--base", "nobody/no-such-model",
                           "--corpus", str(sw_corpus))
    assert_one_error_line(code, err, "nobody/no-such-model", "--base PATH")
    assert_nothing_tracked(workdir)


def test_missing_base_directory_is_not_a_hub_lookup(capsys, workdir, sw_corpus):
    code, _, err = run_cli(capsys, "train-lang", "--lang", "sw", "--base", "./models/absent",
                           "--corpus", str(sw_corpus))
    assert_one_error_line(code, err, "absent")


def test_usage_errors_are_one_line(capsys, workdir):
    code, _, err = run_cli(capsys, "train-lang")
    assert_one_error_line(code, err, "--lang")


def test_debug_shows_traceback(capsys, workdir, tiny):
    from xlpeft.errors import XlpeftError

    with pytest.raises(XlpeftError):
        main(["--debug", "train-lang", "--lang", "xx", "--base", tiny])


def test_train_lang_success_prints_where_things_went(capsys, workdir, tiny, sw_corpus):
    main(["train-lang", "--lang", "sw", "--base", tiny, "--corpus", str(sw_corpus), "--max-steps", "3",
          "--set", "max_seq_len=32"])
    out = capsys.readouterr().out
    assert "modules/lang-sw-adapter" in out and "xlpeft-lang-sw-adapter version 1" in out


def test_python_dash_m_works_like_the_command():
    proc = subprocess.run([sys.executable, "-m", "xlpeft", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "train-lang" in proc.stdout


def test_impossible_sft_split_fails_before_any_run(capsys, workdir, tiny, sw_corpus):
    code, _, err = run_cli(capsys, "train-lang", "--lang", "sw", "--method", "sft", "--base", tiny, "--corpus",
                           str(sw_corpus), "--max-steps", "1")
    assert_one_error_line(code, err, "cannot split --max-steps 1")
    assert_nothing_tracked(workdir)
