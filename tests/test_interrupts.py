"""SIGTERM is held while a tracking-store write runs, and raised when it ends."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from xlpeft.console import Terminated, on_sigterm
from xlpeft.interrupts import clear, deferred, poll


@pytest.fixture
def sigterm_handler():
    clear()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    yield
    signal.signal(signal.SIGTERM, previous)
    clear()  # the request is sticky; the next test starts without one


def test_sigterm_outside_a_deferred_block_raises_at_once(sigterm_handler):
    with pytest.raises(Terminated):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode


class _SignalsWhenCollected:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs inside the finaliser, as in a GC callback


def test_sigterm_swallowed_by_a_finaliser_is_raised_again_by_poll(sigterm_handler, monkeypatch):
    """Python ignores an exception raised in a finaliser; the request stays, and poll() raises it."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(info.exc_type))
    obj = _SignalsWhenCollected()
    del obj  # Terminated is raised in __del__ and swallowed there
    monkeypatch.undo()
    assert seen == [Terminated]  # the case the test is about happened: the first raise was lost
    with pytest.raises(Terminated):
        poll()
    with pytest.raises(Terminated):
        poll()  # sticky: every later poll too, the process is ending


def test_poll_without_a_request_does_nothing(sigterm_handler):
    poll()


def test_training_loop_stops_at_the_next_step_after_a_swallowed_sigterm(sigterm_handler, monkeypatch):
    import torch

    from xlpeft.config import TrainConfig
    from xlpeft.training import train_loop

    weight = torch.nn.Parameter(torch.zeros(2))
    steps = []

    def after_step(step: int) -> None:
        steps.append(step)
        if step == 3:
            _SignalsWhenCollected()  # collected at once: the signal lands in its finaliser

    batches = iter(lambda: torch.ones(2), None)
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(info.exc_type))
    with pytest.raises(Terminated):
        train_loop([weight], batches, lambda x: (weight * x).sum(), TrainConfig(lr=1e-2), 50, lambda m, s: None,
                   after_step=after_step, progress=False)
    assert seen == [Terminated] and steps == [1, 2, 3]  # lost once in the finaliser, raised by the next step


def test_sigterm_inside_a_deferred_block_waits_for_its_end(sigterm_handler):
    done = []
    with pytest.raises(Terminated):
        with deferred():
            with deferred():  # nested: only the outermost block delivers it
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("inner")
            done.append("outer")
    assert done == ["inner", "outer"]  # the whole write ran before the signal was raised


def test_tracker_finishes_the_store_write_a_sigterm_arrived_in(workdir, monkeypatch, sigterm_handler):
    """The run is marked KILLED, not left RUNNING, when the signal lands inside log_batch."""
    from mlflow.tracking import MlflowClient

    from xlpeft import tracking

    real = MlflowClient.log_batch
    sent = []

    def log_batch(self, *args, **kwargs):
        if not kwargs.get("metrics") or sent:
            return real(self, *args, **kwargs)
        sent.append("signalled")
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the write
        result = real(self, *args, **kwargs)
        sent.append("written")  # without the deferral, Terminated would have cut the write here
        return result

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    with pytest.raises(Terminated):
        with tracking.tracked_run("sigterm", {"xlpeft.kind": "language"}, {"a": 1}) as tracker:
            tracker.log_metrics({"loss": 1.0}, 1)
            raise AssertionError("not reached: the signal is raised when log_batch returns")
    c = tracking.client()
    run = c.get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert sent == ["signalled", "written"]
    assert run.data.metrics == {"loss": 1.0}  # the write the signal arrived in completed
