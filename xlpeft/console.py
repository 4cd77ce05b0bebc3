"""Terminal-facing helpers of the CLI: names on the command line, standard input, signals, progress bars."""

from __future__ import annotations

import re
import sys

import click

from xlpeft.errors import XlpeftError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
OVERWRITE_HELP = "replace an xlpeft module of another kind at --output (anything that is not an xlpeft module is never replaced)"


def check_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--lang/--task are codes or pack folder names (letters, digits, ``_.-``): never paths or quotes."""
    if value is not None and not NAME.fullmatch(value):
        shown = value if len(value) <= 60 else value[:60] + "..."
        raise click.BadParameter(f"should be a language code or pack name (letters, digits, _ . -); got {shown!r}"
                                 + ("; packs are looked up by name in task_packs/ or $XLPEFT_PACKS" if "/" in value
                                    else ""))
    return value


def read_stdin_lines() -> list[str]:
    """Standard input as UTF-8 lines; invalid UTF-8 is one error naming the byte offset."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream without bytes (tests, some IDEs)
        try:
            return sys.stdin.read().splitlines()
        except UnicodeDecodeError as exc:
            raise XlpeftError(f"standard input is not UTF-8 ({exc.reason}); re-encode it, e.g. iconv -t UTF-8") from None
    data = stream.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise XlpeftError(f"standard input is not UTF-8 (byte {exc.start}: {exc.reason}); re-encode it, "
                          "e.g. iconv -t UTF-8") from None
    return text.removeprefix("\ufeff").splitlines()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the MLflow run is closed and the checkpoint kept on the way out."""


def on_sigterm(signum, frame) -> None:
    """Raise :class:`Terminated`, or hold it until a tracking-store write in progress has ended."""
    from xlpeft.interrupts import request

    request(Terminated)


RESUME_HINT = ("a run that had started is marked KILLED in MLflow and its last checkpoint kept; "
               "run the same command with --resume to continue it")


def close_progress_bars() -> None:
    """End a progress bar the error interrupted, so the ``Error:`` line starts a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
