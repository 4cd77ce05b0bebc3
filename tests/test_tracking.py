"""Tracking that keeps modules safe: fail-fast probe, buffered calls while the store is down, a spool
that replays, registration only after a verified upload, and one SQLite store shared by processes.

The store here is the per-test SQLite file of the `workdir` fixture; "down" is simulated by a client
that fails the way MLflow's REST client fails when its server is gone. The live server is in
test_tracking_server.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.test_cli import assert_one_error_line, run_cli
from xlpeft import tracking
from xlpeft.errors import XlpeftError
from xlpeft.tracking import RETRY_ENV, TrackingUnfinished, replay_spool, spool_path, store, tracked_run

REPO = Path(__file__).resolve().parents[1]
NAME = "xlpeft-lang-sw-adapter"
TAGS = {"xlpeft.kind": "language", "xlpeft.lang": "sw", "xlpeft.method": "adapter"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(uri: str = "http://127.0.0.1:1"):
    """Raise what MLflow's REST client raises when nothing listens: MlflowException <- requests <- OSError."""
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as err:
            raise requests.ConnectionError("Max retries exceeded") from err
    except requests.ConnectionError as exc:
        raise MlflowException(f"API request to {uri} failed with exception {exc}")  # noqa: B904 (as MLflow does)


class Flaky:
    """A client that fails every call, as if its server were gone, while ``down`` is set."""

    def __init__(self, inner) -> None:
        self.inner, self.down, self.calls = inner, False, []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down:
                refused()
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, made once: creating the schema takes seconds per test otherwise."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    tracking.client(f"sqlite:///{db}")
    return db


@pytest.fixture
def store_dir(workdir, store_template) -> Path:
    """The workdir, its MLflow store already created."""
    shutil.copyfile(store_template, workdir / "mlflow.db")
    return workdir


@pytest.fixture
def flaky(store_dir, monkeypatch) -> Flaky:
    """Runs opened by tracked_run (and replays) go through a Flaky client on the workdir store."""
    wrapper = Flaky(tracking.client())
    monkeypatch.setattr("xlpeft.tracking.run.client", lambda uri=None: wrapper)
    monkeypatch.setattr("xlpeft.tracking.spool.client", lambda uri=None: wrapper)  # replay_spool's
    return wrapper


@pytest.fixture
def module_dir(tmp_path) -> Path:
    out = tmp_path / "modules" / "lang-sw-adapter"
    out.mkdir(parents=True)
    (out / "xlpeft.json").write_text(json.dumps({"kind": "language"}), encoding="utf-8")
    (out / "adapter.safetensors").write_bytes(os.urandom(4096))
    return out


def spooled(run_id: str) -> list[dict]:
    return [json.loads(line) for line in spool_path(run_id).read_text(encoding="utf-8").splitlines()]


def local_artifacts(run_id: str) -> Path:
    return Path(unquote(urlparse(tracking.client().get_run(run_id).info.artifact_uri).path))


# ---- failing fast


def test_unreachable_server_fails_fast_with_one_clear_line(workdir, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(XlpeftError) as info:
        with tracked_run("never", TAGS, {}):
            pytest.fail("the run must not open")
    assert time.monotonic() - start < 5
    assert str(info.value) == (f"MLflow tracking server {uri} is unreachable (ConnectionRefusedError: Connection "
                               "refused); start it or unset MLFLOW_TRACKING_URI to use the local SQLite store")
    with pytest.raises(XlpeftError, match="unreachable"):
        tracking.list_versions(NAME)  # not a misleading "nothing registered"
    tracking.check_reachable(f"sqlite:///{workdir / 'other.db'}")  # local stores need no server


def test_cli_stops_before_training_when_the_server_is_down(capsys, workdir, monkeypatch, base_dirs, sw_corpus):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    code, _, err = run_cli(capsys, "train-lang", "--lang", "sw", "--base", str(base_dirs["tiny-bert"]),
                           "--corpus", str(sw_corpus), "--max-steps", "2", "--set", "max_seq_len=32")
    assert_one_error_line(code, err, "is unreachable (ConnectionRefusedError", "unset MLFLOW_TRACKING_URI")
    assert not (workdir / "modules").exists()


def test_mlflow_http_retries_are_short_but_the_users_settings_win(monkeypatch):
    monkeypatch.setattr(store, "_user_http", None)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    store._configure()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # MLflow's default 7 retries take minutes
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    with store._single_attempt(quick=True):  # the Tracker's own attempts: no MLflow retries
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"


def test_bad_retry_window_is_reported_before_the_run(workdir, monkeypatch):
    monkeypatch.setenv(RETRY_ENV, "soon")
    with pytest.raises(XlpeftError, match=f"{RETRY_ENV} should be a number of seconds >= 0, got 'soon'"):
        with tracked_run("never", TAGS, {}):
            pass
    assert not (workdir / "mlflow.db").exists()


# ---- the store goes away during a run


def test_calls_are_buffered_while_the_store_is_down_and_logged_in_order(flaky, capsys):
    with tracked_run("flaky", TAGS, {"lr": 0.1}) as tr:
        tr.log_metrics({"loss": 5.0}, 1)
        flaky.down = True
        start = time.monotonic()
        for step in range(2, 6):
            tr.log_metrics({"loss": 6.0 - step}, step)
        tr.set_tags({"note": "outage"})
        assert time.monotonic() - start < 1, "training must not wait for the store"
        ops = spooled(tr.run_id)
        assert ops[0] == {"op": "run", "run_id": tr.run_id, "uri": tracking.tracking_uri()}
        assert [op["op"] for op in ops[1:]] == ["metrics"] * 4 + ["tags"]
        flaky.down = False
        tr._retry_at = 0.0  # skip the backoff instead of sleeping through it
        tr.log_metrics({"loss": 0.5}, 6)
        assert not spool_path(tr.run_id).exists()
    c = tracking.client()
    run = c.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["note"] == "outage" and run.data.params["lr"] == "0.1"
    assert [(m.step, m.value) for m in c.get_metric_history(tr.run_id, "loss")] == [
        (1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0), (5, 1.0), (6, 0.5)]
    err = capsys.readouterr().err
    assert err.count("Warning: MLflow") == 1 and "Traceback" not in err
    assert "ConnectionRefusedError: Connection refused" in err and "answers again" in err


def test_store_still_down_at_the_end_keeps_the_module_and_the_spool_replays(flaky, module_dir, monkeypatch, capsys):
    monkeypatch.setenv(RETRY_ENV, "1")
    with pytest.raises(TrackingUnfinished) as info:
        with tracked_run("down", TAGS, {}) as tr:
            tr.log_metrics({"loss": 1.0}, 1)
            flaky.down = True
            tr.log_metrics({"loss": 0.5}, 2)
            start = time.monotonic()
            tr.log_artifacts(module_dir, "module")
            tr.log_metrics({"trainable_parameters": 10}, 2)
            tr.register(NAME, "module", {"xlpeft.base_fingerprint": "abc"})
    assert time.monotonic() - start < 5, "the retry window is bounded"
    message = str(info.value)
    assert f"the module is complete and safe at {module_dir}" in message
    assert f"python -m xlpeft.tracking replay {tr.run_id}" in message and str(spool_path(tr.run_id)) in message
    assert "create_model_version" not in flaky.calls and "create_registered_model" not in flaky.calls
    assert [op["op"] for op in spooled(tr.run_id)[1:]] == ["metrics", "artifacts", "metrics", "register",
                                                           "terminate"]
    assert spooled(tr.run_id)[-1]["status"] == "FINISHED"
    assert capsys.readouterr().err.count("Warning: MLflow") == 1

    flaky.down = False
    c = tracking.client()
    assert c.get_run(tr.run_id).info.status == "RUNNING" and tracking.list_registered() == []
    saved = spool_path(tr.run_id).read_text(encoding="utf-8")
    assert replay_spool(tr.run_id) == "1"
    assert not spool_path(tr.run_id).exists()
    run = c.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(tr.run_id, "loss")] == [1, 2]
    assert {a.path for a in c.list_artifacts(tr.run_id, "module")} == {"module/xlpeft.json",
                                                                      "module/adapter.safetensors"}
    # a replay whose answer was lost is repeated: still one version
    spool_path(tr.run_id).write_text(saved, encoding="utf-8")
    assert replay_spool(tr.run_id) == "1"
    assert [v.version for v in tracking.list_versions(NAME)] == ["1"]
    with pytest.raises(XlpeftError, match=f"no spooled tracking calls for run {tr.run_id}"):
        replay_spool(tr.run_id)


def test_replay_command_line(flaky, module_dir, monkeypatch, capsys):
    from xlpeft.tracking.__main__ import _main

    monkeypatch.setenv(RETRY_ENV, "0")
    with pytest.raises(TrackingUnfinished):
        with tracked_run("down", TAGS, {}) as tr:
            flaky.down = True
            tr.log_artifacts(module_dir, "module")
            tr.register(NAME, "module", {})
    flaky.down = False
    assert _main(["replay"]) == 0
    assert f"run {tr.run_id}: spooled calls logged; registered as version 1" in capsys.readouterr().out
    assert _main(["replay", "nope"]) == 2


def test_a_failure_while_down_marks_the_run_failed_on_replay(flaky, capsys):
    with pytest.raises(RuntimeError, match="diverged"):
        with tracked_run("boom", TAGS, {}) as tr:
            flaky.down = True
            tr.log_metrics({"loss": float("nan")}, 1)
            raise RuntimeError("diverged")
    assert "could not be marked FAILED" in capsys.readouterr().err
    flaky.down = False
    assert replay_spool(tr.run_id) is None
    assert tracking.client().get_run(tr.run_id).info.status == "FAILED"


def test_resumed_run_first_sends_what_a_killed_process_left_in_its_spool(flaky):
    c = tracking.client()
    run_id = c.create_run(tracking.store._experiment_id(c)).info.run_id
    killed = tracking.Tracker(run_id, flaky, tracking.tracking_uri())  # the process that died
    killed.log_metrics({"loss": 3.0}, 1)
    flaky.down = True
    killed.log_metrics({"loss": 2.0}, 2)
    assert spool_path(run_id).is_file()
    flaky.down = False
    with tracked_run("resumed", TAGS, {"lr": 0.1}, run_id=run_id) as tr:
        assert not spool_path(run_id).exists()
        tr.log_metrics({"loss": 1.0}, 3)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {}  # params belong to the first start
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == [1, 2, 3]


# ---- registration only after a complete upload


def test_register_refuses_an_incomplete_upload(store_dir, module_dir):
    with pytest.raises(XlpeftError, match="incomplete \\(adapter.safetensors missing"):
        with tracked_run("partial", TAGS, {}) as tr:
            tr.log_artifacts(module_dir, "module")
            (local_artifacts(tr.run_id) / "module" / "adapter.safetensors").unlink()  # lost on the store's side
            tr.register(NAME, "module", {})
    assert tracking.list_registered() == []
    assert tracking.client().get_run(tr.run_id).info.status == "FAILED"


def test_failed_version_creation_leaves_no_empty_registered_name(store_dir, module_dir, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise MlflowException("the registry refused")

    monkeypatch.setattr(MlflowClient, "create_model_version", refuse)
    with pytest.raises(MlflowException, match="refused"):
        with tracked_run("refused", TAGS, {}) as tr:
            tr.log_artifacts(module_dir, "module")
            tr.register(NAME, "module", {})
    assert tracking.list_registered() == []
    assert tracking.client().get_run(tr.run_id).info.status == "FAILED"


def test_interrupted_upload_registers_nothing(store_dir, module_dir, monkeypatch):
    real = MlflowClient.log_artifacts

    def interrupted(self, run_id, local_dir, artifact_path=None):
        real(self, run_id, local_dir, artifact_path)
        raise KeyboardInterrupt

    monkeypatch.setattr(MlflowClient, "log_artifacts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with tracked_run("interrupted", TAGS, {}) as tr:
            tr.log_artifacts(module_dir, "module")
            tr.register(NAME, "module", {})
    assert tracking.list_registered() == []
    assert tracking.client().get_run(tr.run_id).info.status == "KILLED"  # Ctrl-C / SIGTERM, not a failure


# ---- one SQLite store, several processes


def _env(tmp_path: Path, uri: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "XLPEFT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


FIRST_USE = """
import sys, time
from pathlib import Path
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
from xlpeft import tracking
c = tracking.client()
eid = tracking.store._experiment_id(c)
run = c.create_run(eid)
c.set_terminated(run.info.run_id)
"""


def test_processes_creating_a_fresh_store_at_once(tmp_path):
    """Plain MLflow 3.17 fails this nearly every time: "duplicate column name: step", "table latest_metrics
    already exists", alembic's "expected to match one row" (its schema migration is not guarded)."""
    db = tmp_path / "fresh" / "mlflow.db"
    env, go = _env(tmp_path, f"sqlite:///{db}"), tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE, str(go)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(1.0)  # let the interpreters start, then release them together
    go.touch()
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("SELECT count(*), min(status), max(status) FROM runs").fetchone() == (2, "FINISHED",
                                                                                                  "FINISHED")
        assert con.execute("SELECT count(*) FROM experiments WHERE name = 'xlpeft'").fetchone() == (1,)


@pytest.mark.slow
def test_two_trainings_share_one_sqlite_store(tmp_path, base_dirs, sw_corpus):
    db = tmp_path / "shared" / "mlflow.db"
    env = _env(tmp_path, f"sqlite:///{db}")
    procs = []
    for i in (1, 2):
        cmd = [sys.executable, "-m", "xlpeft", "train-lang", "--lang", "sw", "--base", str(base_dirs["tiny-bert"]),
               "--corpus", str(sw_corpus), "--max-steps", "5", "--seed", str(i), "--set", "max_seq_len=32",
               "--set", "log_every=1", "--output", str(tmp_path / f"m{i}")]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "database is locked" not in err
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert sorted(con.execute("SELECT status FROM runs").fetchall()) == [("FINISHED",), ("FINISHED",)]
        assert sorted(con.execute("SELECT name, version FROM model_versions").fetchall()) == [(NAME, 1), (NAME, 2)]
        assert con.execute("SELECT count(*) FROM metrics WHERE key = 'loss'").fetchone() == (10,)
    for i in (1, 2):
        assert (tmp_path / f"m{i}" / "xlpeft.json").is_file()
