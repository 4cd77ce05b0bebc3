"""SIGTERM is held while a tracking-store write runs, and raised when it ends."""

from __future__ import annotations

import os
import signal

import pytest

from xlpeft.console import Terminated, on_sigterm
from xlpeft.interrupts import deferred


@pytest.fixture
def sigterm_handler():
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_outside_a_deferred_block_raises_at_once(sigterm_handler):
    with pytest.raises(Terminated):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode


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
