"""The spool: a run's tracking calls kept on disk while the store does not answer, and their replay.

``$XLPEFT_CACHE/spool/<run_id>.jsonl`` holds one header line (run id and store URI), then one JSON
line per pending call, in order. :class:`~xlpeft.tracking.run.Tracker` writes it when the store stops
answering and deletes it once everything is logged; a process that was killed, or that gave up
waiting, leaves it for ``python -m xlpeft.tracking replay RUN_ID`` (:func:`replay_spool`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from xlpeft.errors import XlpeftError
from xlpeft.tracking.store import client, tracking_uri

REPLAY_HINT = "python -m xlpeft.tracking replay"


def spool_path(run_id: str) -> Path:
    """Where the calls of run ``run_id`` are spooled: ``$XLPEFT_CACHE/spool/<run_id>.jsonl``."""
    from xlpeft.models import cache_dir

    return cache_dir() / "spool" / f"{run_id}.jsonl"


def write_spool(run_id: str, uri: str, ops: list[dict[str, Any]]) -> None:
    """Replace the run's spool with its header and ``ops``, atomically (a crash leaves the old one or the new)."""
    path = spool_path(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"op": "run", "run_id": run_id, "uri": uri}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(json.dumps(x) for x in [header, *ops]) + "\n", encoding="utf-8")
    tmp.replace(path)


def append_spool(run_id: str, op: dict[str, Any]) -> None:
    """Add one call to a spool :func:`write_spool` created (one line: a crash cuts at most that line)."""
    with spool_path(run_id).open("a", encoding="utf-8") as f:
        f.write(json.dumps(op) + "\n")


def read_spool(run_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, calls) of a run's spool; a line cut short by a crash is skipped.

    Raises:
        XlpeftError: the file has no header line (not written by xlpeft).
    """
    lines = []
    for line in spool_path(run_id).read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not lines or lines[0].get("op") != "run":
        raise XlpeftError(f"{spool_path(run_id)} is not an xlpeft tracking spool (no header line)")
    return lines[0], lines[1:]


def replay_spool(run_id: str, uri: str | None = None) -> str | None:
    """Log a run's spooled tracking calls, in order, to the store the run lives in (or ``uri``).

    Safe to repeat: metrics are de-duplicated by MLflow, params and tags are rewritten with the same
    values, artifacts overwritten, and a version already registered for the run is not registered again.

    Returns:
        The registered version if the spool registered a module, else None.

    Raises:
        XlpeftError: no spool for ``run_id``, or the server is unreachable; TrackingUnfinished: it stopped
            answering again within the retry window (the spool keeps what is left).
    """
    from xlpeft.tracking.run import Tracker  # the run module writes spools: imported here, not at the top

    path = spool_path(run_id)
    if not path.is_file():
        held = sorted(p.stem for p in path.parent.glob("*.jsonl")) if path.parent.is_dir() else []
        raise XlpeftError(f"no spooled tracking calls for run {run_id} in {path.parent}; "
                          f"spooled runs: {', '.join(held) or 'none'}")
    header, ops = read_spool(run_id)
    uri = uri or header.get("uri") or tracking_uri()
    _check_store_exists(uri, run_id)
    outputs = {op["artifact_path"]: op["local_dir"] for op in ops if op["op"] == "artifacts"}
    tracker = Tracker(run_id, client(uri), uri, _pending=ops, _down=True, _outputs=outputs)
    if not tracker._drain(wait=True, force=True):
        raise tracker.unfinished()
    return tracker._version


def _check_store_exists(uri: str, run_id: str) -> None:
    """A local SQLite store the spool was written for must still exist: replaying into a new empty one loses the run."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):].split("?")[0])
        if not db.is_file():
            raise XlpeftError(f"the store {uri} that run {run_id} was logged to no longer exists; the spool "
                              f"{spool_path(run_id)} is kept: restore the store file, then run `{REPLAY_HINT} {run_id}`")
