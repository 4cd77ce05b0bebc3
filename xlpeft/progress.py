"""Progress that suits where it is written: a live tqdm bar on a terminal, plain lines in a log.

A tqdm bar redraws itself with carriage returns; sent to a file (``make demo > demo.log``) that
is thousands of frames. Every progress bar in xlpeft comes from :func:`progress`, which keeps
tqdm on a terminal and otherwise writes one line when a phase starts, a summary line at most
every ``interval`` seconds, and one line when it ends.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

PLAIN_INTERVAL_S = 30.0
"""Seconds between summary lines when the output is not a terminal."""


def is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """Outside a terminal, also turn off the bars libraries draw themselves (MLflow's artifact downloads)."""
    if not is_terminal(stream if stream is not None else sys.stderr):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, enabled: bool = True, leave: bool = True, stream: TextIO | None = None,
             interval: float = PLAIN_INTERVAL_S):
    """A progress bar over ``iterable`` (or updated by hand): tqdm on a terminal, :class:`LineProgress` otherwise.

    Args:
        total: expected count (None: unknown).
        initial: count already done (a resumed phase).
        enabled: False gives a bar that prints nothing (e.g. data-parallel ranks other than 0).
        leave: False marks a short, secondary phase: in a log it prints only if it outlasts ``interval``.
        stream: where to write; default ``sys.stderr`` at call time.
        interval: seconds between summary lines in a log.
    """
    stream = stream if stream is not None else sys.stderr
    if enabled and is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=stream,
                    dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, enabled=enabled,
                        leave=leave, stream=stream, interval=interval)


class LineProgress:
    """The subset of tqdm's interface xlpeft uses (update, set_postfix, close, iteration, with), as log lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, enabled: bool = True, leave: bool = True,
                 stream: TextIO | None = None, interval: float = PLAIN_INTERVAL_S) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start_n = initial
        self.enabled, self.leave, self.interval = enabled, leave, interval
        self.stream = stream if stream is not None else sys.stderr
        self.postfix = ""
        self.closed = False
        self.start = self.last = time.monotonic()
        self.printed = False
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)  # type: ignore[arg-type]
        if leave:
            where = f" at {initial}" if initial else ""
            self._write(f"{desc}: started ({self.total} {unit}{where})" if self.total else f"{desc}: started")

    def _write(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.stream, flush=True)
            self.printed = True

    def _summary(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n} {self.unit}"
        left = ""
        if self.total and rate > 0 and self.n < self.total:
            left = f", ~{_duration((self.total - self.n) / rate)} left"
        post = f", {self.postfix}" if self.postfix else ""
        return f"{count}, {rate:.2f} {self.unit}/s, {_duration(elapsed)} elapsed{left}{post}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._write(f"{self.desc}: {self._summary()}")

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave or self.printed:  # a short secondary phase that printed nothing stays silent
            self._write(f"{self.desc}: done, {self._summary()}")

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
