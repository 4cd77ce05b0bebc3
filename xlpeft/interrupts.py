"""Signals that end a run, delivered only where stopping is safe.

SIGTERM is turned into an exception (:class:`xlpeft.console.Terminated`) so the MLflow run is
closed and the checkpoint kept on the way out. Raised in the middle of a tracking-store write,
that exception would leave the store's session (and xlpeft's inter-process SQLite lock) half
used, and the closing call that marks the run KILLED would then fail too. Code that must not be
cut in half runs inside :func:`deferred`; a signal that arrives there is raised when it ends.

Python swallows an exception raised in a finaliser or weakref callback (it prints "Exception
ignored in ..." and goes on), and a signal handler runs in whatever Python code is executing,
garbage-collection callbacks included: SQLAlchemy's are frequent during MLflow writes. So a
request also stays recorded, and the long loops (training steps, evaluation batches) call
:func:`poll` to raise it again where it cannot be lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0
_pending: type[BaseException] | None = None
_requested: type[BaseException] | None = None  # sticky: the process is ending once a signal asked for it


def request(exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` now, or at the end of the outermost :func:`deferred` block if inside one."""
    global _pending, _requested
    _requested = exc_type
    if _depth:
        _pending = exc_type
        return
    raise exc_type()


@contextmanager
def deferred() -> Iterator[None]:
    """Hold signals routed through :func:`request` until the block (the outermost one) ends."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            exc_type, _pending = _pending, None
            raise exc_type()


def poll() -> None:
    """Raise a requested signal's exception again, in case a finaliser swallowed the first raise."""
    if _requested is not None and not _depth:
        raise _requested()


def clear() -> None:
    """Forget requests: a new command (or a test) in the same process starts with none."""
    global _pending, _requested
    _pending = _requested = None
