"""Hostile-input harness: run the CLI in-process and check that a refusal is clean.

Clean means: a non-zero exit code, exactly one ``Error:`` line on stderr without "unexpected"
or a traceback, the user's files unchanged, no MLflow run left RUNNING (and none at all for
input that can be checked before work starts) and no registry entry created.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SW_WORDS, make_lines, make_ner, write_conll
from xlpeft.cli import main

STORE_FILES = {"mlflow.db", "mlflow.db.xlpeft-lock"}


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every user file under ``root`` (the MLflow store, its artifacts and the cache excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if (rel.parts[0] in ("mlruns", "cache", "mlartifacts") or ".checkpoints" in rel.parts
                or rel.name in STORE_FILES or not p.is_file()):
            continue
        out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        lines = [line for line in self.err.splitlines() if line.startswith("Error:")]
        return lines[0] if lines else ""


def run_cli(capsys, *args: str) -> Outcome:
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


def runs_by_status() -> dict[str, int]:
    from xlpeft import tracking

    counts: dict[str, int] = {}
    c = tracking.client()
    for e in c.search_experiments():
        for r in c.search_runs([e.experiment_id]):
            counts[r.info.status] = counts.get(r.info.status, 0) + 1
    return counts


def registered() -> list[tuple[str, str]]:
    from xlpeft import tracking

    return [(n, v.version) for n in tracking.list_registered() for v in tracking.list_versions(n)]


class Store:
    """The working directory of one test: its files and MLflow store, compared before/after a command."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mark()

    def mark(self) -> None:
        has_db = (self.root / "mlflow.db").exists()
        self.files = snapshot(self.root)
        self.runs = runs_by_status() if has_db else {}
        self.models = registered() if has_db else []

    def run(self, capsys, *args: str) -> Outcome:
        """Snapshot the store and files, then run ``xlpeft ARGS`` in-process."""
        capsys.readouterr()
        self.mark()
        return run_cli(capsys, *args)

    def refused(self, outcome: Outcome, *needles: str, runs: str = "none", code: int | None = None) -> None:
        """Assert a clean refusal. ``runs``: "none" (no new run) or "failed" (new runs ended FAILED/KILLED)."""
        assert outcome.code != 0, f"exit 0; stdout: {outcome.out[-500:]} stderr: {outcome.err[-1500:]}"
        if code is not None:
            assert outcome.code == code, (outcome.code, outcome.err[-1500:])
        errors = [line for line in outcome.err.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, outcome.err[-3000:]
        assert "unexpected" not in errors[0] and "Traceback" not in outcome.err, outcome.err[-3000:]
        assert len(errors[0]) < 2000, "an error line should not carry unbounded data"
        for needle in needles:
            assert needle.lower() in errors[0].lower(), errors[0]
        assert snapshot(self.root) == self.files, "user files changed"
        self.assert_store(runs)

    def assert_store(self, runs: str = "none") -> None:
        now = runs_by_status() if (self.root / "mlflow.db").exists() else {}
        assert now.get("RUNNING", 0) == self.runs.get("RUNNING", 0), f"a run was left RUNNING: {now}"
        if runs == "none":
            assert now == self.runs, f"bad input created runs: {self.runs} -> {now}"
        assert (registered() if (self.root / "mlflow.db").exists() else []) == self.models, "a registry entry was created"


def interrupt_after_checkpoint(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make training stop like Ctrl-C right after it writes its first checkpoint (kept for --resume).

    Returns a function that puts the real checkpoint writer back, for a test that then resumes.
    """
    import xlpeft.training as training

    real = training.save_checkpoint

    def save_then_interrupt(directory, tensors, meta):
        real(directory, tensors, meta)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_interrupt)
    return lambda: monkeypatch.setattr(training, "save_checkpoint", real)


@pytest.fixture
def tiny(base_dirs) -> str:
    return str(base_dirs["tiny-bert"])


@pytest.fixture
def store(workdir) -> Store:
    (workdir / "notes.txt").write_text("the user's own file\n", encoding="utf-8")
    return Store(workdir)


@pytest.fixture
def corpus(workdir) -> Path:
    path = workdir / "sw.txt"
    path.write_text("\n".join(make_lines(SW_WORDS, 120, seed=2)) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def ner(workdir) -> dict[str, Path]:
    return {"train": write_conll(workdir / "train.conll", make_ner(60, seed=1)),
            "eval": write_conll(workdir / "eval.conll", make_ner(20, seed=2))}


def lang_args(tiny: str, corpus: Path, *extra: str) -> list[str]:
    return ["train-lang", "--lang", "sw", "--base", tiny, "--corpus", str(corpus), "--max-steps", "2",
            "--set", "max_seq_len=32", *extra]


def task_args(tiny: str, ner: dict[str, Path], *extra: str) -> list[str]:
    return ["train-task", "--task", "ner", "--base", tiny, "--train-data", str(ner["train"]), "--eval-data",
            str(ner["eval"]), "--max-steps", "2", "--set", "lang_module=none", "--set", "max_seq_len=32", *extra]
