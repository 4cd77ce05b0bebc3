"""Where runs go: the tracking URI, a fail-fast probe of servers, and a client safe to share a SQLite store.

MLflow's own HTTP retries are cut short (xlpeft retries logging itself, see :mod:`xlpeft.tracking.run`),
and a local SQLite store is guarded by an inter-process file lock (``<db>.xlpeft-lock``): two processes
creating a fresh ``mlflow.db`` at once otherwise race in MLflow's schema migration ("duplicate column
name: step", MLflow 3.17), and the lock keeps one writer at a time afterwards.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from xlpeft.errors import XlpeftError

EXPERIMENT = "xlpeft"

# MLflow retries a failed HTTP call 7 times with exponential backoff (about 4 minutes) and waits 120 s
# for an answer. xlpeft retries logging itself (see Tracker), so MLflow's own retries stay short.
# Values the user exported win.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_user_http: set[str] | None = None  # which of _HTTP_DEFAULTS the user had set before xlpeft touched them
_probed: set[str] = set()  # http URIs that answered once in this process
_initialised: set[str] = set()  # sqlite URIs whose schema this process created or saw complete


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the SQLite store ``mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


def check_uri(uri: str) -> None:
    """Refuse a tracking URI MLflow cannot open (``foo://bar``, a bare path) before anything runs."""
    scheme, sep, _ = uri.partition("://")
    if not sep or scheme.split("+")[0].lower() not in _SCHEMES:
        shown = uri if len(uri) <= 120 else uri[:120] + "..."
        raise XlpeftError(f"MLFLOW_TRACKING_URI={shown!r} is not a tracking URI xlpeft can use; expected "
                          "sqlite:///PATH/mlflow.db, http(s)://HOST:PORT, file:///ABSOLUTE/PATH or a database URL "
                          "(unset it to use ./mlflow.db)")


def _configure() -> None:
    global _user_http
    for noisy in ("alembic", "mlflow", "mlflow.store", "mlflow.tracking"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    if _user_http is None:
        _user_http = {k for k in _HTTP_DEFAULTS if k in os.environ}
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


# ---- reachability


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast if an http(s) tracking server does not answer; local stores need no check.

    Any HTTP answer counts as reachable except 502/503/504 (a proxy in front of a dead server).

    Raises:
        XlpeftError: within about ``timeout`` seconds, naming the server and why it failed.
    """
    uri = uri or tracking_uri()
    check_uri(uri)
    if not _is_http(uri):
        return
    import requests

    verify: bool | str = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
        verify = False
    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout, verify=verify)
    except requests.RequestException as exc:
        raise XlpeftError(_unreachable(uri, _reason(exc))) from None
    if response.status_code in (502, 503, 504):
        raise XlpeftError(_unreachable(uri, f"HTTP {response.status_code} from {uri}/health"))
    _probed.add(uri)


def _unreachable(uri: str, reason: str) -> str:
    return (f"MLflow tracking server {uri} is unreachable ({reason}); start it or unset MLFLOW_TRACKING_URI "
            "to use the local SQLite store")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        reason = getattr(e, "reason", None)  # urllib3's MaxRetryError keeps the cause here
        stack += [e.__cause__, e.__context__, reason if isinstance(reason, BaseException) else None]


def _reason(exc: BaseException) -> str:
    """The root cause of a failed call in a few words: 'ConnectionRefusedError: Connection refused'."""
    import requests

    causes = list(_chain(exc))
    for e in causes:
        if isinstance(e, OSError) and type(e).__module__ in ("builtins", "socket", "ssl"):
            return f"{type(e).__name__}: {e.strerror or e}"
    for e in causes:
        if isinstance(e, requests.Timeout):
            return f"no answer within the timeout ({type(e).__name__})"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _transient(exc: BaseException) -> bool:
    """Worth retrying later: the server or store did not answer, as opposed to refusing the call."""
    import requests

    for e in _chain(exc):
        if isinstance(e, requests.ConnectionError | requests.Timeout | requests.exceptions.RetryError |
                      requests.exceptions.ChunkedEncodingError | ConnectionError | TimeoutError):
            return True
        if isinstance(e, requests.HTTPError) and e.response is not None and e.response.status_code in (429, 502,
                                                                                                       503, 504):
            return True
        if getattr(e, "error_code", None) == "TEMPORARILY_UNAVAILABLE" or "database is locked" in str(e):
            return True
    return False


@contextmanager
def _single_attempt(quick: bool) -> Iterator[None]:
    """MLflow HTTP calls without MLflow's own retries (the Tracker retries instead), unless the user set them.

    ``quick``: also answer within 5 s, so a hung server costs a training step little.
    """
    override = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", **({"MLFLOW_HTTP_REQUEST_TIMEOUT": "5"} if quick else {})}
    override = {k: v for k, v in override.items() if _user_http is not None and k not in _user_http}
    old = {k: os.environ.get(k) for k in override}
    os.environ.update(override)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---- local SQLite: one writer at a time across processes


def _lock_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].split("?")[0]
    if not db or db == ":memory:":
        return None
    db_path = Path(db).resolve()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    return db_path.with_name(db_path.name + ".xlpeft-lock")


_held: dict[str, int] = {}  # lock file -> depth, so nested calls in one process do not deadlock
_held_fds: dict[str, int] = {}
_thread_lock = threading.RLock()


@contextmanager
def _store_lock(path: Path, timeout: float = 300.0) -> Iterator[None]:
    """Exclusive inter-process lock (flock) on ``path``; re-entrant within a process."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on SQLite's own busy timeout
        yield
        return
    key = str(path)
    with _thread_lock:
        if key not in _held:
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o666)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise XlpeftError(f"another process has held the MLflow store lock {key} for over "
                                          f"{timeout:.0f} s; is an xlpeft process hung? Stop it and retry") from None
                    time.sleep(0.02)
            _held_fds[key], _held[key] = fd, 0
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
            if _held[key] == 0:
                fd = _held_fds.pop(key)
                del _held[key]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


class _Client:
    """An MlflowClient whose calls hold the store lock (local SQLite only) and retry "database is locked"."""

    def __init__(self, inner: Any, lock: Path | None) -> None:
        self._inner, self._lock = inner, lock

    def locked(self):
        """Hold the store lock across several calls (no-op for servers)."""
        return _store_lock(self._lock) if self._lock is not None else nullcontext()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or self._lock is None:
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            for attempt in range(5):
                try:
                    with self.locked():
                        return attr(*args, **kwargs)
                except Exception as exc:
                    # Another program (mlflow ui, a notebook) may hold SQLite's lock; the failed
                    # transaction was rolled back, so trying again is safe.
                    if attempt == 4 or "database is locked" not in str(exc):
                        raise
                    time.sleep(0.2 * 2 ** attempt)

        return call


def client(uri: str | None = None):
    """An MlflowClient on ``uri`` (default :func:`tracking_uri`), MLflow's start-up logging silenced.

    An http(s) server is probed the first time (:func:`check_reachable`); a local SQLite store gets its
    schema created under the store lock.
    """
    _configure()
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    check_uri(uri)
    if _is_http(uri) and uri not in _probed:
        check_reachable(uri)
    lock = _lock_path(uri)
    with _store_lock(lock) if lock is not None else nullcontext():
        inner = MlflowClient(tracking_uri=uri, registry_uri=uri)  # creates the tracking tables if missing
        if lock is not None and uri not in _initialised:
            inner.search_registered_models(max_results=1)  # and the registry store, while we hold the lock
            _initialised.add(uri)
    return _Client(inner, lock)


# The experiment tag MLflow 3.x's UI reads to choose an experiment's first page (the JS enum in
# mlflow/server/js/build/static/js/main.*.js: "genai_development" opens the GenAI Overview,
# "custom_model_development" the runs table). Set when xlpeft creates the experiment or finds it
# untagged; a kind chosen in the UI since is kept.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _experiment_id(c) -> str:
    """The id of xlpeft's experiment (``$XLPEFT_EXPERIMENT``, default ``xlpeft``), created if missing."""
    from mlflow.exceptions import MlflowException

    name = os.environ.get("XLPEFT_EXPERIMENT", EXPERIMENT)
    with c.locked():
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
                c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        try:
            return c.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as exc:  # another process created it since we looked (a server store)
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
            return c.get_experiment_by_name(name).experiment_id
