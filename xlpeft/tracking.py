"""MLflow: one run per command, tags for lineage, module directories as artifacts, a registry entry.

Tracking URI: ``$MLFLOW_TRACKING_URI`` or an embedded SQLite store ``mlflow.db`` in the working
directory (browse with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``). Registered model
names are ``xlpeft-lang-<lang>-<method>`` and ``xlpeft-task-<task>-<method>``, so later commands
find modules by name, never by run id.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlpeft.errors import XlpeftError

EXPERIMENT = "xlpeft"
TAG_KEYS = ("xlpeft.kind", "xlpeft.lang", "xlpeft.task", "xlpeft.method", "xlpeft.base", "xlpeft.base_fingerprint")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def registered_name(kind: str, name: str, method: str) -> str:
    prefix = {"language": "lang", "task": "task"}[kind]
    return f"xlpeft-{prefix}-{name}-{method}"


def _quiet() -> None:
    for noisy in ("alembic", "mlflow", "mlflow.store", "mlflow.tracking"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def client():
    """An MlflowClient on :func:`tracking_uri`, with MLflow's start-up logging silenced."""
    _quiet()
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(c) -> str:
    name = os.environ.get("XLPEFT_EXPERIMENT", EXPERIMENT)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name)


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]
    return out


@dataclass
class Tracker:
    """A live MLflow run; every call goes through the client (no global active-run state)."""

    run_id: str
    _client: Any

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in _flat(params).items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            if v is not None:
                self._client.set_tag(self.run_id, k, str(v))

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self._client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_file(self, local_file: Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(local_file), artifact_path)

    def register(self, name: str, artifact_path: str, tags: dict[str, str]) -> str:
        """Create a model version of ``name`` pointing at this run's ``artifact_path``; returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            self._client.create_registered_model(name, description="xlpeft module (see xlpeft.json in the artifacts)")
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        run = self._client.get_run(self.run_id)
        source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
        version = self._client.create_model_version(name, source=source, run_id=self.run_id, tags=tags)
        return str(version.version)


@contextmanager
def tracked_run(run_name: str, tags: dict[str, Any], params: dict[str, Any]) -> Iterator[Tracker]:
    """Open an MLflow run; it ends FINISHED, or FAILED (and re-raises) if the body raises."""
    c = client()
    run = c.create_run(_experiment_id(c), run_name=run_name, tags={k: str(v) for k, v in tags.items() if v is not None})
    tracker = Tracker(run.info.run_id, c)
    try:
        tracker.log_params(params)
        yield tracker
    except BaseException:
        c.set_terminated(run.info.run_id, status="FAILED")
        raise
    c.set_terminated(run.info.run_id, status="FINISHED")


@dataclass(frozen=True)
class RegisteredModule:
    name: str
    version: str
    run_id: str
    tags: dict[str, str]
    created: int = 0  # creation timestamp (ms)


def list_versions(name: str) -> list[RegisteredModule]:
    """All versions of a registered module, newest first (empty if the name is unknown)."""
    c = client()
    try:
        versions = c.search_model_versions(f"name='{name}'")
    except Exception:
        return []
    out = [RegisteredModule(v.name, str(v.version), v.run_id, dict(v.tags or {}), int(v.creation_timestamp or 0))
           for v in versions]
    return sorted(out, key=lambda v: int(v.version), reverse=True)


def list_registered(prefix: str = "xlpeft-") -> list[str]:
    c = client()
    return sorted(m.name for m in c.search_registered_models() if m.name.startswith(prefix))


def find_module(name: str, fingerprint: str | None = None, fetch: bool = True) -> tuple[Path, RegisteredModule]:
    """Newest version of ``name`` trained on the base ``fingerprint``, downloaded to the local cache.

    With ``fetch=False`` only the registry is consulted (the returned path may not exist yet).

    Raises:
        XlpeftError: nothing registered under ``name`` for that base; the message lists what exists.
    """
    versions = list_versions(name)
    matching = [v for v in versions if fingerprint is None or v.tags.get("xlpeft.base_fingerprint") == fingerprint]
    if not matching:
        held = ", ".join(f"{n}" for n in list_registered()) or "nothing"
        detail = f" on base fingerprint {fingerprint}" if fingerprint and versions else ""
        raise XlpeftError(
            f"no registered module {name!r}{detail} in {tracking_uri()}; the registry holds: {held}. "
            "Train it first (xlpeft train-lang / train-task) or pass a module directory"
        )
    if not fetch:
        return Path(), matching[0]
    return download(matching[0])


def find_newest(kind: str, name: str, fingerprint: str, method: str | None = None) -> tuple[Path, RegisteredModule]:
    """Newest registered ``kind`` module for ``name`` (lang or task) on this base, of ``method`` or any method.

    Raises:
        XlpeftError: none registered; the message lists what the registry holds for this base.
    """
    from xlpeft.registry import method_names

    candidates = []
    for m in [method] if method else method_names():
        versions = list_versions(registered_name(kind, name, m))
        candidates += [v for v in versions if v.tags.get("xlpeft.base_fingerprint") == fingerprint]
    if not candidates:
        held = [n for n in list_registered()
                if any(v.tags.get("xlpeft.base_fingerprint") == fingerprint for v in list_versions(n))]
        wanted = registered_name(kind, name, method or "*")
        raise XlpeftError(
            f"no registered {kind} module {wanted} on base fingerprint {fingerprint} in {tracking_uri()}; "
            f"for this base the registry holds: {', '.join(held) or 'nothing'}"
        )
    return download(max(candidates, key=lambda v: (v.created, int(v.version))))


def download(chosen: RegisteredModule) -> tuple[Path, RegisteredModule]:
    """Fetch a registered module's artifacts into the local cache (once per run id)."""
    from xlpeft.models import cache_dir

    target = cache_dir() / "registry" / chosen.run_id
    if not (target / "module" / "xlpeft.json").is_file():
        tmp = target.with_name(f".{chosen.run_id}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        client().download_artifacts(chosen.run_id, "module", str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target / "module", chosen
