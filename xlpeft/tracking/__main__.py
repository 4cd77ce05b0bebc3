"""``python -m xlpeft.tracking replay [RUN_ID ...]``: log spooled tracking calls once the server is back."""

from __future__ import annotations

import sys

from xlpeft.errors import XlpeftError
from xlpeft.tracking.spool import REPLAY_HINT, replay_spool, spool_path


def _main(argv: list[str]) -> int:
    """Replay the given runs' spools, or every spooled run if none is given; 0 if all were logged."""
    if not argv or argv[0] != "replay":
        print(f"usage: {REPLAY_HINT} [RUN_ID ...]", file=sys.stderr)
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
