"""Progress in a log is lines, not carriage-return frames (issue 14, smaller defects)."""

import io

import pytest
from tqdm.auto import tqdm

from xlpeft.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_start_and_an_end_line_only():
    log = io.StringIO()
    bar = progress(total=1000, desc="sw adapter", unit="step", stream=log, interval=3600)
    assert isinstance(bar, LineProgress)
    for _ in range(1000):
        bar.update(1)
    bar.set_postfix(loss="2.345")
    bar.close()
    bar.close()  # idempotent
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "sw adapter: started (1000 step)"
    assert lines[1].startswith("sw adapter: done, 1000/1000 step (100%)") and lines[1].endswith("loss=2.345")
    assert len(lines) == 2


def test_periodic_summaries_in_a_log():
    log = io.StringIO()
    with progress(total=5, desc="phase", unit="step", stream=log, interval=0.0) as bar:
        for _ in range(5):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 + 5 + 1
    assert lines[3].startswith("phase: 3/5 step (60%)")


def test_short_secondary_phases_stay_silent_in_a_log():
    log = io.StringIO()
    for _ in progress(range(50), desc="tokenising", stream=log, leave=False, interval=3600):
        pass
    assert log.getvalue() == ""


def test_disabled_bars_print_nothing():
    log = io.StringIO()
    with progress(total=3, desc="rank 1", stream=log, enabled=False, interval=0.0) as bar:
        bar.update(3)
    assert log.getvalue() == ""


def test_a_terminal_keeps_tqdm():
    term = Terminal()
    bar = progress(total=3, desc="x", stream=term)
    assert isinstance(bar, tqdm)
    bar.close()


def test_train_loop_writes_lines_to_a_log(capsys):
    import torch

    from xlpeft.config import TrainConfig
    from xlpeft.training import train_loop

    w = torch.nn.Parameter(torch.zeros(3))
    data = iter(lambda: torch.ones(3), None)
    train_loop([w], data, lambda b: ((w - b) ** 2).sum(), TrainConfig(log_every=5), 20, lambda *_: None, desc="toy")
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    assert "\r" not in err
    assert err.splitlines()[0] == "toy: started (20 step)"
    assert err.splitlines()[-1].startswith("toy: done, 20/20 step (100%)")


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (125, "2m05s"), (3725, "1h02m")])
def test_durations(seconds, text):
    from xlpeft.progress import _duration

    assert _duration(seconds) == text


def test_library_bars_are_turned_off_in_a_log(monkeypatch):
    from xlpeft.progress import quiet_library_bars

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    quiet_library_bars(Terminal())
    import os

    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    quiet_library_bars(io.StringIO())
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
