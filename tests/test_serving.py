"""Serving a zero-shot composition: `xlpeft compose --register`, then MLflow's real scoring server answers
`POST /invocations` with the tags `xlpeft predict` prints; the server is stopped by its process group.

Tiny language and task adapters on tiny BERT; the server is `mlflow models serve --env-manager local` on
127.0.0.1, reading the test's SQLite store. Starting it takes ~10-20 s here, so the test is marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import EN_WORDS, SW_WORDS, make_lines, make_ner, write_conll
from xlpeft.cli import main
from xlpeft.recipes.predict import predict_lines
from xlpeft.recipes.train_lang import LangRequest, train_language
from xlpeft.recipes.train_task import TaskRequest, train_task

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["Juma met Amina in Nairobi", "Kenyatta said that Safaricom works in London City", "Mary visited Lagos"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_ping(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"no /ping answer within {timeout:.0f} s: {log.read_text()[-3000:]}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_registered_composition_is_served_with_the_tags_of_predict(workdir, base_dirs, capsys):
    base = str(base_dirs["tiny-bert"])
    for lang, words in (("en", EN_WORDS), ("sw", SW_WORDS)):
        corpus = workdir / f"{lang}.txt"
        corpus.write_text("\n".join(make_lines(words, 60)), encoding="utf-8")
        train_language(LangRequest(lang=lang, base=base, corpus=(str(corpus),),
                                   sets={"max_steps": "2", "max_seq_len": "48"}))
    write_conll(workdir / "train.conll", make_ner(80, seed=1))
    write_conll(workdir / "sw.conll", make_ner(10, seed=5))
    train_task(TaskRequest(task="ner", lang="en", base=base, train_data=str(workdir / "train.conll"),
                           sets={"max_steps": "20", "batch_size": "16", "max_seq_len": "48", "lr": "3e-3"}))
    main(["compose", "--lang", "sw", "--task", "ner", "--base", base, "--eval-data", str(workdir / "sw.conll"),
          "--register"])
    assert "registered as xlpeft-ner-sw version 1" in capsys.readouterr().out
    expected = [list(tags) for _, tags in predict_lines("sw", "ner", base, SENTENCES)]

    port = free_port()
    # the scoring server execs `uvicorn` from PATH: the one next to this Python, as in an activated venv
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": path}
    log = workdir / "serve.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/xlpeft-ner-sw@latest",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_ping(proc, url, log)
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": SENTENCES}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            body = json.loads(answer.read())
        assert body == {"predictions": expected}
        assert [len(tags) for tags in expected] == [5, 8, 3]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is not None and not group_alive(proc.pid)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/ping", timeout=2)
