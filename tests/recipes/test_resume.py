"""Crash and resume: kill -9 mid-run, --resume continues the same MLflow run and ends with the same module."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from tests.methods.fused_inputs import cli_settings
from tests.tiers import cli_methods
from xlpeft import load_module, tracking
from xlpeft.checkpoint import CHECKPOINT

STEPS = 24
# Per-method settings that keep a tiny run tiny (LT-SFT's default K is larger than a tiny base); not the method list.
SMALL = {"sft": ("--set", "num_params=1500"), "compacter": ("--set", "reduction_factor=4"),
         "parallel": ("--set", "adapter_drop=1"),  # parallel: its row also checks that AdapterDrop resumes exactly
         # SpIEL's dynamic delta, killed at the checkpoint of step 12, inside the gradient window of steps 10-13
         "sft:dynamic": ("--set", "num_params=1500", "--set", "selection=dynamic", "--set", "reselect_every=10",
                         "--set", "accumulation_steps=3"),
         # a streamed corpus: the checkpoint holds the shuffle buffer and the stream position, not an order
         "adapter:stream": ("--set", "corpus_mode=stream", "--set", "stream_buffer=16"),
         # new vocabulary rows (xlpeft.vocab) beside the module: in the checkpoint, in the export
         "adapter:vocab": ("--set", "new_tokens=5"), "sft:vocab": ("--set", "num_params=1500", "--set", "new_tokens=5"),
         # sub-word pieces: the resumed process rebuilds the extended tokenizer, and must hit the same token cache
         "adapter:pieces": ("--set", "new_tokens=5", "--set", "new_token_unit=piece")}


def _cmd(base_dir, corpus, out, method, extra=()):
    return [sys.executable, "-m", "xlpeft", "train-lang", "--lang", "sw", "--method", method, "--base", str(base_dir),
            "--corpus", str(corpus), "--max-steps", str(STEPS), "--output", str(out), "--set", "max_seq_len=32",
            "--set", "checkpoint_every=4", "--set", "log_every=4", "--set", "lr=1e-2", *extra]


def _env(workdir, **kw):
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "XLPEFT_CACHE": str(workdir / "cache"),
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **kw}


# Runs the CLI with save_checkpoint wrapped so the process SIGKILLs itself right after the checkpoint
# at or past MIN_STEP is on disk: a real kill -9 (no clean-up runs), at a point that does not depend
# on how fast the machine is. Polling from outside raced a tiny model that finishes in milliseconds.
_CRASHER = """
import os, signal, sys
import xlpeft.training as training
from xlpeft.cli import main

real = training.save_checkpoint


def save_then_die(directory, tensors, meta):
    path = real(directory, tensors, meta)
    if meta["done"] >= int(os.environ["XLPEFT_TEST_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return path


training.save_checkpoint = save_then_die
main(sys.argv[1:])
"""


def _kill_after_checkpoint(cmd, env, cwd, min_step: int) -> None:
    """Run training until a checkpoint at or past ``min_step`` is written, then SIGKILL it."""
    assert cmd[1:3] == ["-m", "xlpeft"]
    proc = subprocess.run([cmd[0], "-c", _CRASHER, *cmd[3:]], env={**env, "XLPEFT_TEST_KILL_AT": str(min_step)},
                          cwd=cwd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, f"expected a SIGKILL, got {proc.returncode}: {proc.stderr[-2000:]}"
    assert list(cwd.glob(f"**/.checkpoints/*/{CHECKPOINT}")), "the checkpoint the run died after is on disk"


@pytest.mark.slow
@pytest.mark.parametrize("method", [*cli_methods(), pytest.param("sft:dynamic", marks=pytest.mark.exhaustive),
                                    pytest.param("adapter:stream", marks=pytest.mark.exhaustive), "adapter:vocab",
                                    pytest.param("sft:vocab", marks=pytest.mark.exhaustive), "adapter:pieces"])
def test_kill_and_resume_equals_uninterrupted(workdir, base_dirs, sw_corpus, method):
    base_dir, extra = base_dirs["tiny-bert"], SMALL.get(method, ())
    method = method.split(":")[0]  # a row may be a method with a variant's settings
    extra = (*extra, *cli_settings(method, base_dir))  # a fusion's modules to fuse, made on the base
    # the reference: one uninterrupted run
    ref = workdir / "ref"
    subprocess.run(_cmd(base_dir, sw_corpus, ref, method, extra), env=_env(workdir, MLFLOW_TRACKING_URI=
                   f"sqlite:///{workdir / 'ref.db'}"), cwd=workdir, check=True, capture_output=True, timeout=300)
    # the crashed run, then --resume
    out = workdir / "crashed"
    _kill_after_checkpoint(_cmd(base_dir, sw_corpus, out, method, extra), _env(workdir), workdir, min_step=STEPS // 2)
    runs = tracking.client().search_runs([tracking.client().get_experiment_by_name("xlpeft").experiment_id])
    assert [r.info.status for r in runs] == ["RUNNING"], "SIGKILL leaves the run unfinished"
    assert not (out / "xlpeft.json").exists() and tracking.list_registered() == [], "nothing half-registered"
    resumed = subprocess.run(_cmd(base_dir, sw_corpus, out, method, extra) + ["--resume"], env=_env(workdir),
                             cwd=workdir, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    resumed_lines = [line for line in resumed.stderr.splitlines() if line.startswith("resuming MLflow run")]
    assert len(resumed_lines) == 1 and runs[0].info.run_id in resumed_lines[0]
    if "corpus_mode=stream" in extra:  # the stream re-opens at the checkpointed position, behind it nothing is read
        assert "stream: resuming at" in resumed.stderr and "token cache" not in resumed.stderr
    else:
        assert "token cache hit" in resumed.stderr and "token cache built" not in resumed.stderr, "never re-tokenised"
    runs = tracking.client().search_runs([tracking.client().get_experiment_by_name("xlpeft").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", "the same MLflow run was continued"
    a, b = load_module(ref), load_module(out)
    assert a.tensors.keys() == b.tensors.keys() and a.tensors
    assert ("vocab" in a.tensors) == ("new_tokens=5" in extra)
    assert a.manifest.extra.get("new_vocab", {}).get("unit", "word") == ("piece" if "new_token_unit=piece" in extra
                                                                           else "word")
    for stem, state in a.tensors.items():
        assert state.keys() == b.tensors[stem].keys(), stem
        for key, value in state.items():
            torch.testing.assert_close(b.tensors[stem][key], value, rtol=0, atol=1e-6, msg=f"{stem}/{key}")
    assert not list(workdir.glob("**/.checkpoints/*")), "checkpoints are removed once the module is published"


def test_finished_run_is_never_resumed_and_changed_config_is_refused(workdir, base_dirs, sw_corpus, capsys):
    from xlpeft.cli import main

    args = ["train-lang", "--lang", "sw", "--base", str(base_dirs["tiny-bert"]), "--corpus", str(sw_corpus),
            "--max-steps", "3", "--set", "max_seq_len=32"]
    main(args)
    main(args + ["--resume"])
    err = capsys.readouterr().err
    assert "no unfinished run with a checkpoint matches this command; starting a new run" in err
    runs = tracking.client().search_runs([tracking.client().get_experiment_by_name("xlpeft").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    # an unfinished run with another config is refused, naming the key
    c = tracking.client()
    c.update_run(runs[0].info.run_id, status="FAILED")
    c.set_tag(runs[0].info.run_id, "xlpeft.checkpoint_dir", str(workdir / "nowhere"))
    with pytest.raises(SystemExit):
        main(args[:-2] + ["--set", "max_seq_len=64", "--resume"])
    error = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.startswith("Error:")]
    assert len(error) == 1 and error[0].startswith("Error: the unfinished run") and "train.max_seq_len" in error[0]
