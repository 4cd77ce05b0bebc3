"""``python -m xlpeft.tracking replay [RUN_ID ...]``: log spooled tracking calls once the server is back.

``python -m xlpeft.tracking ui-url [HOST:PORT]``: the MLflow UI address of xlpeft's runs table (``make ui`` prints it).
"""

from __future__ import annotations

import sys

from xlpeft.errors import XlpeftError
from xlpeft.tracking.spool import REPLAY_HINT, replay_spool, spool_path


def ui_url(address: str = "127.0.0.1:5000") -> str:
    """The UI page of the experiment's runs table.

    MLflow 3.x tags the experiment ``mlflow.experimentKind`` (xlpeft sets custom_model_development), but its
    UI picks the first page from ``?workflowType=`` or the sidebar switch remembered in the browser (default
    genai: the GenAI overview), so the link carries ``workflowType=machine_learning``.
    """
    from xlpeft.tracking.store import _experiment_id, client

    return f"http://{address}/#/experiments/{_experiment_id(client())}?workflowType=machine_learning"


def _main(argv: list[str]) -> int:
    """Replay the given runs' spools, or every spooled run if none is given; 0 if all were logged."""
    if argv and argv[0] == "ui-url":
        print(f"xlpeft runs: {ui_url(*argv[1:2])}")
        return 0
    if not argv or argv[0] != "replay":
        print(f"usage: {REPLAY_HINT} [RUN_ID ...], or python -m xlpeft.tracking ui-url [HOST:PORT]", file=sys.stderr)
        return 2
    spool = spool_path("-").parent
    run_ids = argv[1:] or sorted(p.stem for p in spool.glob("*.jsonl"))
    if not run_ids:
        print(f"nothing spooled in {spool}")
    for run_id in run_ids:
        try:
            version = replay_spool(run_id)
        except XlpeftError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # e.g. the store refuses the run: one line, the spool is kept
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            print(f"Error: replaying run {run_id} failed ({type(exc).__name__}: {first}); its spool "
                  f"{spool_path(run_id)} is kept for another try", file=sys.stderr)
            return 1
        print(f"run {run_id}: spooled calls logged" + (f"; registered as version {version}" if version else ""))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
