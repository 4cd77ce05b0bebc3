"""Training against a real `mlflow server` on loopback: a normal run, the server dying mid-run and coming
back within the retry window, and the server staying down (module safe on disk, spool replayed later).

One server (SQLite backend, artifacts proxied with --serve-artifacts) serves the whole module; it is
killed and restarted on the same port and store by the drop tests, and always stopped at the end.
Starting it takes ~10-20 s here, so these tests are marked slow (they still run in `make test`).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.test_cli import run_cli
from xlpeft import load_module, tracking
from xlpeft.models import load_base
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.tracking import RETRY_ENV, Tracker, spool_path
from xlpeft.tracking.flavor import MODEL_FILES

MODEL_ARTIFACTS = [f"module/{name}" for name in MODEL_FILES]  # a module folder is an MLflow Model

pytestmark = pytest.mark.slow

NAME = "xlpeft-lang-sw-adapter"


class MlflowServer:
    """`mlflow server` in its own process group, so it and its workers can be killed together."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: starts in half the time
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'srv.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server gave no /health answer within {timeout:.0f} s: {self.log_tail()}")

    def kill(self) -> None:
        """Die like a crashed server: SIGKILL to the whole group."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    def log_tail(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def on_server(server, tmp_path, monkeypatch) -> Path:
    """A clean working directory whose runs go to the live server."""
    if server.proc is None or server.proc.poll() is not None:
        server.start()  # an earlier test left it dead
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("XLPEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def request(base_dirs, corpus, out: Path, steps: int) -> LangRequest:
    return LangRequest(lang="sw", base=str(base_dirs["tiny-bert"]), corpus=(str(corpus),), output=str(out),
                       sets={"max_steps": str(steps), "max_seq_len": "32", "lr": "1e-2", "log_every": "1"})


def kill_at_step(monkeypatch, server: MlflowServer, step: int, then=None) -> threading.Event:
    """Kill the server when training logs ``step`` (and run ``then`` in a thread); the event is set once done."""
    killed, real = threading.Event(), Tracker.log_metrics

    def log_metrics(self, metrics, at):
        if at >= step and not killed.is_set():
            server.kill()
            killed.set()
            if then is not None:
                threading.Thread(target=then, daemon=True).start()
        real(self, metrics, at)

    monkeypatch.setattr(Tracker, "log_metrics", log_metrics)
    return killed


def test_run_on_a_live_server(on_server, base_dirs, sw_corpus):
    result = train_language(request(base_dirs, sw_corpus, on_server / "module", 4))
    c = tracking.client()
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # uploads went through the server
    assert run.data.tags["xlpeft.lang"] == "sw" and run.data.tags["xlpeft.method"] == "adapter"
    fingerprint = load_base(str(base_dirs["tiny-bert"])).fingerprint
    assert run.data.tags["xlpeft.base_fingerprint"] == fingerprint
    assert [m.step for m in c.get_metric_history(result.run_id, "loss")] == [1, 2, 3, 4]
    assert {a.path for a in c.list_artifacts(result.run_id, "module")} == {"module/xlpeft.json",
                                                                           "module/adapter.safetensors", *MODEL_ARTIFACTS}
    versions = [v for v in tracking.list_versions(NAME) if v.run_id == result.run_id]
    assert [v.version for v in versions] == [result.version]
    path, _ = tracking.find_reference(NAME, fingerprint)
    downloaded, local = load_module(path).tensors["adapter"], load_module(result.path).tensors["adapter"]
    assert all(torch.equal(downloaded[k], local[k]) for k in local)


def test_server_dies_mid_run_and_returns_within_the_retry_window(on_server, server, base_dirs, sw_corpus,
                                                                   monkeypatch, capsys):
    monkeypatch.setenv(RETRY_ENV, "180")
    failures: list[BaseException] = []

    def restart():
        try:
            server.start()
        except BaseException as exc:  # surfaced below; the test would otherwise wait out the window
            failures.append(exc)

    killed = kill_at_step(monkeypatch, server, 3, then=restart)
    result = train_language(request(base_dirs, sw_corpus, on_server / "module", 10))
    assert killed.is_set() and not failures
    err = capsys.readouterr().err
    assert err.count("Warning: MLflow at") == 1 and "Traceback" not in err and "answers again" in err
    c = tracking.client()
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(result.run_id, "loss")] == list(range(1, 11))  # none lost
    assert {a.path for a in c.list_artifacts(result.run_id, "module")} == {"module/xlpeft.json",
                                                                           "module/adapter.safetensors", *MODEL_ARTIFACTS}
    assert [v.run_id for v in tracking.list_versions(NAME) if v.version == result.version] == [result.run_id]
    assert load_module(result.path).manifest.training["steps"] == 10
    assert not spool_path(result.run_id).exists()


def test_server_stays_down_module_is_safe_and_the_spool_replays(on_server, server, base_dirs, sw_corpus,
                                                                monkeypatch, capsys):
    monkeypatch.setenv(RETRY_ENV, "2")
    kill_at_step(monkeypatch, server, 3)
    out = on_server / "modules" / "sw"
    start = time.monotonic()
    code, _, err = run_cli(capsys, "train-lang", "--lang", "sw", "--base", str(base_dirs["tiny-bert"]),
                           "--corpus", str(sw_corpus), "--max-steps", "10", "--set", "max_seq_len=32",
                           "--set", "log_every=1", "--output", str(out))
    assert time.monotonic() - start < 60
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"the module is complete and safe at {out}" in errors[0]
    run_id = re.search(r"MLflow run (\w+) is unfinished", errors[0]).group(1)
    assert f"python -m xlpeft.tracking replay {run_id}" in errors[0]
    module = load_module(out)  # complete and valid on disk
    assert module.manifest.training["steps"] == 10

    server.start()  # same port, same store
    c = tracking.client()
    assert c.get_run(run_id).info.status == "RUNNING"
    assert not [v for v in tracking.list_versions(NAME) if v.run_id == run_id], "registered before upload"
    replay = subprocess.run([sys.executable, "-m", "xlpeft.tracking", "replay", run_id], capture_output=True,
                            text=True, timeout=300, cwd=on_server,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert replay.returncode == 0, replay.stderr
    assert "registered as version" in replay.stdout
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == list(range(1, 11))
    assert {a.path for a in c.list_artifacts(run_id, "module")} == {"module/xlpeft.json",
                                                                    "module/adapter.safetensors", *MODEL_ARTIFACTS}
    path, version = tracking.find_reference(NAME, module.manifest.base["fingerprint"])
    assert version.run_id == run_id
    downloaded = load_module(path).tensors["adapter"]
    assert all(torch.equal(downloaded[k], v) for k, v in module.tensors["adapter"].items())
    assert not spool_path(run_id).exists()
