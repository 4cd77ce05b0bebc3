"""A live MLflow run that never stops training: buffered, spooled and retried tracking calls.

When the store stops answering, :class:`Tracker` calls wait in memory and in a spool file
``$XLPEFT_CACHE/spool/<run_id>.jsonl`` and are retried with backoff on later calls; training does not
wait. Uploading the module, registering it and closing the run retry for ``$XLPEFT_TRACKING_RETRY_SECONDS``
(default 60); then the run stops with :class:`TrackingUnfinished`, which names the module directory
(complete on disk: recipes save and verify it before logging) and the replay command,
``python -m xlpeft.tracking replay RUN_ID``. A version is registered only after the uploaded files were
listed back and match the module directory. The spool file itself and its replay are
:mod:`xlpeft.tracking.spool`.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlpeft.errors import XlpeftError
from xlpeft.interrupts import deferred
from xlpeft.tracking.registration import apply_inputs, apply_table, register_version
from xlpeft.tracking.spool import REPLAY_HINT, append_spool, read_spool, spool_path, write_spool
from xlpeft.tracking.store import (
    _experiment_id,
    _is_http,
    _reason,
    _single_attempt,
    _transient,
    _unreachable,
    check_reachable,
    client,
    tracking_uri,
)

RETRY_ENV = "XLPEFT_TRACKING_RETRY_SECONDS"
_MAX_DELAY = 10.0  # seconds between retries at most, so a server that is back is noticed soon


class TrackingUnfinished(XlpeftError):
    """The run's outputs are complete on disk but could not all be logged to MLflow; the spool holds the rest."""


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]
    return out


# ---- the run


def source_tags(argv: list[str] | None = None) -> dict[str, str]:
    """MLflow's source tags for a run: the xlpeft command line (``sys.argv``, shell-quoted) as a LOCAL source.

    The program is named ``xlpeft`` (not the path of the console script or of ``xlpeft/__main__.py``),
    so the UI's Source column, which shows the text after the last ``/``, starts with the command.
    """
    args = list(sys.argv if argv is None else argv)
    if args and (Path(args[0]).name in ("xlpeft", "__main__.py", "-m")):
        args[0] = "xlpeft"
    return {"mlflow.source.name": shlex.join(args)[:5000] or "xlpeft", "mlflow.source.type": "LOCAL"}


def retry_seconds() -> float:
    """Seconds the end of a run waits for a store that stopped answering: ``$XLPEFT_TRACKING_RETRY_SECONDS``, 60."""
    raw = os.environ.get(RETRY_ENV, "60")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise XlpeftError(f"{RETRY_ENV} should be a number of seconds >= 0, got {raw!r}")
    return value


@dataclass
class Tracker:
    """A live MLflow run; every call goes through the client (no global active-run state).

    Calls are applied in order. When the store does not answer, they wait in ``_pending`` (mirrored in
    the spool file) and are retried on later calls, at most every 1, 2, 4, ... 10 s; a retry costs a
    refused connection (milliseconds), or 5 s at most if the server hangs. ``log_artifacts``,
    ``log_file`` and ``register`` wait up to :func:`retry_seconds` for the store.
    """

    run_id: str
    _client: Any
    _uri: str = ""
    _pending: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _down: bool = False  # the last attempt failed; the spool file mirrors _pending
    _warned: bool = False
    _gave_up: bool = False  # the retry window was spent once: later calls try once, no waiting
    _reason: str = ""
    _delay: float = 1.0
    _retry_at: float = 0.0
    _version: str | None = None
    _outputs: dict[str, str] = field(default_factory=dict)  # artifact path -> local directory

    def log_params(self, params: dict[str, Any]) -> None:
        items = list(_flat(params).items())
        for i in range(0, len(items), 100):
            self._submit({"op": "params", "params": dict(items[i:i + 100])})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._submit({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": step, "ts": now})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items() if v is not None}})

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        local = str(Path(local_dir).resolve())
        self._outputs[artifact_path] = local
        self._finish({"op": "artifacts", "local_dir": local, "artifact_path": artifact_path})

    def log_file(self, local_file: Path, artifact_path: str | None = None) -> None:
        self._finish({"op": "file", "local_file": str(Path(local_file).resolve()), "artifact_path": artifact_path})

    def log_inputs(self, datasets: list[dict[str, Any]]) -> None:
        """Log MLflow dataset inputs (records of :func:`~xlpeft.tracking.registration.dataset_record`)."""
        if datasets:
            self._submit({"op": "inputs", "datasets": list(datasets)})

    def log_table(self, columns: list[str], data: list[list[Any]], artifact_file: str) -> None:
        """Log a table the run page renders (MLflow's table format: ``artifact_file`` ends in ``.json``)."""
        if not artifact_file.endswith(".json"):
            raise XlpeftError(f"an MLflow table is a .json artifact; got {artifact_file!r}")
        rows = [[None if isinstance(x, float) and not math.isfinite(x) else x for x in row] for row in data]  # JSON
        self._finish({"op": "table", "artifact_file": artifact_file, "columns": list(columns), "data": rows})

    def register(self, name: str, artifact_path: str, tags: dict[str, str], description: str = "") -> str:
        """Create a model version of ``name`` pointing at this run's ``artifact_path``; returns the version.

        The uploaded files are listed back and compared with the local directory first. The version gets
        ``description``; the registered name gets the identity tags of ``tags`` (kind, language or task,
        method, base), set again on every registration.

        Raises:
            TrackingUnfinished: the store did not answer within the retry window (nothing registered).
        """
        op = {"op": "register", "name": name, "artifact_path": artifact_path, "tags": dict(tags),
              "local_dir": self._outputs.get(artifact_path), "description": description}
        if not self._finish(op):
            raise self.unfinished()
        return str(self._version)

    # -- buffering and retrying

    def _enqueue(self, op: dict[str, Any]) -> None:
        self._pending.append(op)
        if self._down:
            self._append_spool(op)

    def _submit(self, op: dict[str, Any]) -> None:
        self._enqueue(op)
        self._drain()

    def _finish(self, op: dict[str, Any]) -> bool:
        self._enqueue(op)
        return self._drain(wait=True, force=True)

    def _drain(self, wait: bool = False, force: bool = False) -> bool:
        """Apply pending calls; True when none is left. ``wait``: retry for the window (once per run)."""
        deadline = time.monotonic() + retry_seconds() if wait and not self._gave_up else None
        while self._pending:
            if force or time.monotonic() >= self._retry_at:
                force = False
                if self._attempt(quick=not wait):
                    return True
            if deadline is None:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._gave_up = True
                return False
            time.sleep(max(0.0, min(self._retry_at - time.monotonic(), remaining)))
        return True

    def _attempt(self, quick: bool) -> bool:
        try:
            with _single_attempt(quick), deferred():  # a SIGTERM never cuts a store write in half
                self._apply_pending()
        except Exception as exc:
            if not _transient(exc):
                if self._down:
                    self._write_spool()
                raise
            self._note_down(exc)
            return False
        if self._down:
            self._down, self._delay = False, 1.0
            spool_path(self.run_id).unlink(missing_ok=True)
            if self._warned:
                print(f"MLflow at {self._uri or tracking_uri()} answers again; buffered tracking calls logged",
                      file=sys.stderr, flush=True)
        return True

    def _note_down(self, exc: BaseException) -> None:
        self._reason = _reason(exc)
        self._delay = min(self._delay * 2, _MAX_DELAY) if self._down else 1.0
        self._retry_at = time.monotonic() + self._delay
        self._down = True
        self._write_spool()
        if not self._warned:
            self._warned = True
            print(f"Warning: MLflow at {self._uri or tracking_uri()} is not answering ({self._reason}); training "
                  f"goes on, tracking calls are kept in {spool_path(self.run_id)} and retried", file=sys.stderr,
                  flush=True)

    def _apply_pending(self) -> None:
        from mlflow.entities import Metric

        while self._pending:
            n = 1
            try:
                if self._pending[0]["op"] == "metrics":  # consecutive metric calls go out as one batch
                    batch: list[Metric] = []
                    for n, op in enumerate(self._pending):  # noqa: B007 (n counts the calls batched)
                        if op["op"] != "metrics" or len(batch) + len(op["metrics"]) > 1000:  # MLflow's limit
                            break
                        batch += [Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()]
                    else:
                        n = len(self._pending)
                    self._client.log_batch(self.run_id, metrics=batch)
                else:
                    self._apply(self._pending[0])
            except Exception as exc:
                if not _transient(exc):
                    del self._pending[:max(n, 1)]  # a refused call is not retried forever
                raise
            del self._pending[:max(n, 1)]

    def _apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        c, kind = self._client, op["op"]
        if kind == "params":
            c.log_batch(self.run_id, params=[Param(k, v) for k, v in op["params"].items()])
        elif kind == "tags":
            c.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "artifacts":
            c.log_artifacts(self.run_id, op["local_dir"], op["artifact_path"])
        elif kind == "file":
            c.log_artifact(self.run_id, op["local_file"], op["artifact_path"])
        elif kind == "register":
            self._version = register_version(c, self.run_id, op["name"], op["artifact_path"], op["tags"],
                                             op.get("local_dir"), op.get("description", ""))
        elif kind == "inputs":
            apply_inputs(c, self.run_id, op["datasets"])
        elif kind == "table":
            apply_table(c, self.run_id, op["artifact_file"], op["columns"], op["data"])
        elif kind == "terminate":
            c.set_terminated(self.run_id, status=op["status"])
        else:
            raise XlpeftError(f"unknown spooled tracking call {kind!r} in {spool_path(self.run_id)}")

    # -- the spool file

    def _write_spool(self) -> None:
        write_spool(self.run_id, self._uri or tracking_uri(), self._pending)

    def _append_spool(self, op: dict[str, Any]) -> None:
        append_spool(self.run_id, op)

    def close(self, status: str, wait: bool, attempt: bool = True) -> bool:
        """End the run as ``status``; False if that (or an earlier call) is only spooled.

        ``attempt=False`` only spools it (the run already stopped for want of a server). A FAILED run
        drops uploads and registrations still pending: an interrupted upload is not resumed, and a
        failed run registers nothing.
        """
        if status in ("FAILED", "KILLED"):
            self._pending = [op for op in self._pending if op["op"] not in ("artifacts", "file", "table", "register")]
            if self._down:
                self._write_spool()
        self._enqueue({"op": "terminate", "status": status})
        return self._drain(wait=wait, force=True) if attempt else False

    def unfinished(self) -> TrackingUnfinished:
        """The error for a run whose outputs are on disk but whose tracking calls are only spooled."""
        uri = self._uri or tracking_uri()
        what = f"tracking server {uri}" if _is_http(uri) else f"store {uri}"
        outputs = ", ".join(sorted(set(self._outputs.values())))
        safe = f"the module is complete and safe at {outputs}" if outputs else "the run's outputs on disk are complete"
        return TrackingUnfinished(
            f"MLflow {what} stopped answering ({self._reason}) and did not come back within {retry_seconds():g} s "
            f"({RETRY_ENV}); {safe}. MLflow run {self.run_id} is unfinished and nothing was registered for it yet: "
            f"its remaining tracking calls are kept in {spool_path(self.run_id)}. When the server is back, run "
            f"`{REPLAY_HINT} {self.run_id}` to log them, register the module and close the run"
        )


@contextmanager
def tracked_run(run_name: str, tags: dict[str, Any], params: dict[str, Any],
                run_id: str | None = None) -> Iterator[Tracker]:
    """Open an MLflow run; it ends FINISHED, or FAILED (and re-raises) if the body raises.

    Args:
        run_id: continue this existing run instead (``--resume``): it is set RUNNING again, its params
            are not logged twice, and tracking calls a killed process left in its spool are sent first.

    Raises:
        XlpeftError: the tracking server is unreachable (before the run is created).
        TrackingUnfinished: the server stopped answering during the run and did not come back in time;
            the message says where the module is and how to replay the spooled calls.
    """
    uri = tracking_uri()
    retry_seconds()  # a bad $XLPEFT_TRACKING_RETRY_SECONDS fails now, not after training
    _clean_downloads()
    check_reachable(uri)  # every time: the server may have gone since this process last saw it
    c = client(uri)
    resuming = run_id is not None
    try:
        if not resuming:
            run_tags = {**source_tags(), **{k: str(v) for k, v in tags.items() if v is not None}}
            run_id = c.create_run(_experiment_id(c), run_name=run_name, tags=run_tags).info.run_id
        else:
            c.update_run(run_id, status="RUNNING")
    except Exception as exc:
        if _transient(exc):
            raise XlpeftError(_unreachable(uri, _reason(exc))) from None
        raise
    tracker = Tracker(run_id, c, uri)
    try:
        if resuming and spool_path(run_id).is_file():  # left by a killed process
            tracker._pending = [op for op in read_spool(run_id)[1] if op["op"] in ("params", "metrics", "tags", "inputs")]
            tracker._down = True
            tracker._drain(force=True)
        if not resuming:
            tracker.log_params(params)
        yield tracker
    except TrackingUnfinished:
        tracker.close("FINISHED", wait=False, attempt=False)  # the work is done; the replay closes the run
        raise
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"  # Ctrl-C, SIGTERM (cli.Terminated)
        try:
            if not tracker.close(status, wait=False):
                print(f"Warning: MLflow run {tracker.run_id} could not be marked {status}; "
                      f"`{REPLAY_HINT} {tracker.run_id}` does it later", file=sys.stderr, flush=True)
        except Exception:  # never hide the error that ended the run
            pass
        raise
    if not tracker.close("FINISHED", wait=True):
        raise tracker.unfinished()


def _clean_downloads() -> None:
    """Remove registry downloads (``.<run>.tmp-<pid>``) that killed processes left in the cache."""
    from xlpeft.io import clean_stale
    from xlpeft.models import cache_dir

    try:
        clean_stale(cache_dir() / "registry", ".")
    except OSError:  # a read-only or vanished cache: nothing to clean
        pass
