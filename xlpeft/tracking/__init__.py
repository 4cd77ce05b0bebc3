"""MLflow: one run per command, tags for lineage, module directories as artifacts, a registry entry.

Tracking URI: ``$MLFLOW_TRACKING_URI`` or an embedded SQLite store ``mlflow.db`` in the working
directory (browse with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``). Registered model
names are ``xlpeft-lang-<lang>-<method>`` and ``xlpeft-task-<task>-<method>``, so later commands
find modules by name, never by run id. :mod:`~xlpeft.tracking.store` opens the store,
:mod:`~xlpeft.tracking.run` is the run, :mod:`~xlpeft.tracking.spool` keeps its calls while the store is
down, :mod:`~xlpeft.tracking.lifecycle` opens, resumes and publishes a training run; this module looks
modules up in the registry.

What keeps a module safe when the store misbehaves:

* An http(s) tracking server is probed before a run opens; if it does not answer, one
  :class:`XlpeftError` line says so within seconds, before any training.
* If the server stops answering during a run, training goes on: the :class:`Tracker` buffers its
  calls in memory and in a spool file ``$XLPEFT_CACHE/spool/<run_id>.jsonl`` and retries them with
  backoff. Uploading the module, registering it and closing the run retry for
  ``$XLPEFT_TRACKING_RETRY_SECONDS`` (default 60); if the server is still down the run stops with
  :class:`TrackingUnfinished`, naming the module directory (complete on disk: recipes save and
  verify it before logging) and the command that replays the spool:
  ``python -m xlpeft.tracking replay RUN_ID``.
* A version is registered only after the uploaded files were listed back and match the module
  directory, so the registry never points at a half-uploaded module.
* Several processes can share one local SQLite store: xlpeft's calls take an inter-process file lock
  (``<db>.xlpeft-lock``), which also serialises MLflow's first-time schema creation (two processes
  creating a fresh ``mlflow.db`` at once otherwise fail with "duplicate column name" in MLflow 3.x).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from xlpeft.errors import XlpeftError
from xlpeft.tracking.registration import composition_description, module_description
from xlpeft.tracking.run import RETRY_ENV, Tracker, TrackingUnfinished, retry_seconds, tracked_run
from xlpeft.tracking.spool import replay_spool, spool_path
from xlpeft.tracking.store import (
    EXPERIMENT,
    _reason,
    _transient,
    _unreachable,
    check_reachable,
    client,
    tracking_uri,
)

__all__ = ["EXPERIMENT", "NotRegistered", "RETRY_ENV", "TAG_KEYS", "RegisteredModule", "Tracker", "TrackingUnfinished",
           "alias_version", "check_reachable", "client", "composition_description", "download", "filter_value",
           "find_module", "find_reference", "list_empty", "list_registered", "list_versions", "module_description",
           "parse_registered_name", "promote", "refuse_composition", "registered_name", "replay_spool",
           "retry_seconds", "spool_path", "tracked_run", "tracking_uri"]

PREFIXES = {"language": "lang", "task": "task"}  # module kind -> the word in registered names
TAG_KEYS = ("xlpeft.kind", "xlpeft.lang", "xlpeft.task", "xlpeft.method", "xlpeft.base", "xlpeft.base_fingerprint")


class NotRegistered(XlpeftError):
    """Nothing is registered under the name (for the base); other lookup errors (artifacts gone) are not this."""


def filter_value(value: str) -> str:
    """``value`` quoted for an MLflow search filter; a value holding both quote characters is refused."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise XlpeftError(f"{value[:80]!r} holds both ' and \"; MLflow cannot search for it: use a plain name")


def registered_name(kind: str, name: str, method: str) -> str:
    """The registry name of a ``kind`` module: ``xlpeft-lang-<lang>-<method>`` or ``xlpeft-task-<task>-<method>``."""
    return f"xlpeft-{PREFIXES[kind]}-{name}-{method}"


@dataclass(frozen=True)
class RegisteredModule:
    name: str
    version: str
    run_id: str
    tags: dict[str, str]
    created: int = 0  # creation timestamp (ms)
    aliases: tuple[str, ...] = ()  # registry aliases pointing at this version (``production``)
    description: str = ""  # Markdown: a one-line summary first (registration.module_description)


def list_versions(name: str) -> list[RegisteredModule]:
    """All versions of a registered module, newest first (empty if the name is unknown)."""
    c = client()
    aliases: dict[str, list[str]] = {}  # version -> aliases (a version search does not return them from SQLite)
    try:
        versions = c.search_model_versions(f"name={filter_value(name)}")
        for alias, number in (c.get_registered_model(name).aliases or {}).items() if versions else ():
            aliases.setdefault(str(number), []).append(alias)
    except Exception as exc:
        if _transient(exc):
            raise XlpeftError(_unreachable(tracking_uri(), _reason(exc))) from None
        return []
    out = [RegisteredModule(v.name, str(v.version), v.run_id, dict(v.tags or {}), int(v.creation_timestamp or 0),
                            tuple(sorted(aliases.get(str(v.version), []))), v.description or "") for v in versions]
    return sorted(out, key=lambda v: int(v.version), reverse=True)


def list_registered(prefix: str = "xlpeft-") -> list[str]:
    c = client()
    return sorted(m.name for m in c.search_registered_models() if m.name.startswith(prefix))


def list_empty(prefix: str = "xlpeft-") -> list[str]:
    """Registered names without any version: left by a process killed between creating the name and its version."""
    return [n for n in list_registered(prefix) if not list_versions(n)]


def parse_registered_name(text: str) -> tuple[str, str, str]:
    """``xlpeft-lang-sw-adapter`` -> ``('language', 'sw', 'adapter')``: the inverse of :func:`registered_name`.

    Raises:
        XlpeftError: not an xlpeft registered name, or its method is not registered.
    """
    from xlpeft.registry import method_names

    for kind, prefix in PREFIXES.items():
        head = f"xlpeft-{prefix}-"
        if text.startswith(head):
            name, _, method = text[len(head):].rpartition("-")
            if name and method in method_names():
                return kind, name, method
            raise XlpeftError(f"{text!r} ends in method {method!r}, which is not registered (methods: "
                              f"{', '.join(method_names())}); expected xlpeft-{prefix}-<name>-<method>")
    raise XlpeftError(f"{text!r} is not an xlpeft registered name; expected xlpeft-lang-<lang>-<method> or "
                      "xlpeft-task-<task>-<method>, optionally with @VERSION")


def find_module(kind: str, name: str, method: str | None = None, version: str | None = None,
                fingerprint: str | None = None, fetch: bool = True) -> tuple[Path, RegisteredModule]:
    """The one lookup of a registered module: ``kind`` (language/task) for ``name`` (lang code or task name).

    Args:
        method: only this method's modules; None: the newest of any registered method.
        version: this registry version (needs ``method``: versions are numbered per registered name).
        fingerprint: only modules trained on the base with this fingerprint.
        fetch: download the artifacts to the local cache (False: consult the registry only; the path
            returned may not exist yet).

    Returns:
        (module directory, the registry entry).

    Raises:
        NotRegistered: nothing matches; the message lists what the registry holds (for this base).
        XlpeftError: the store is unreachable, or the version's artifacts are gone.
    """
    from xlpeft.registry import method_names

    if kind not in PREFIXES:
        raise XlpeftError(f"module kind should be one of {', '.join(PREFIXES)}; got {kind!r}")
    if version is not None and method is None:
        raise XlpeftError(f"version {version} of a {kind} module for {name!r} needs its method: registry versions "
                          "are numbered per registered name (xlpeft-<kind>-<name>-<method>@VERSION)")
    candidates = []
    for m in [method] if method else method_names():
        candidates += [v for v in list_versions(registered_name(kind, name, m))
                       if (fingerprint is None or v.tags.get("xlpeft.base_fingerprint") == fingerprint)
                       and (version is None or v.version == str(version))]
    if not candidates:
        wanted = registered_name(kind, name, method or "*") + (f"@{version}" if version else "")
        held = [n for n in list_registered()
                if fingerprint is None or any(v.tags.get("xlpeft.base_fingerprint") == fingerprint
                                              for v in list_versions(n))]
        where = f" on base fingerprint {fingerprint}" if fingerprint else ""
        raise NotRegistered(
            f"no registered {kind} module {wanted}{where} in {tracking_uri()}; "
            f"{'for this base ' if fingerprint else ''}the registry holds: {', '.join(held) or 'nothing'}. "
            "Train it first (xlpeft train-lang / train-task) or pass a module directory"
        )
    chosen = max(candidates, key=lambda v: (v.created, int(v.version)))
    return download(chosen) if fetch else (Path(), chosen)


def find_reference(ref: str, fingerprint: str | None = None) -> tuple[Path, RegisteredModule]:
    """A registry reference ``NAME``, ``NAME@VERSION`` or ``NAME@ALIAS`` (``xlpeft-lang-sw-adapter@production``).

    Digits are a version, ``latest`` (or nothing) the newest version, anything else an alias set with
    ``xlpeft promote``; resolved through :func:`find_module`.

    Raises:
        XlpeftError: a composition's name (``xlpeft-ner-sw``) where a module is expected, or an alias the
            name does not hold (the message lists those it holds).
        NotRegistered: nothing matches.
    """
    text, _, pointer = ref.partition("@")
    try:
        kind, name, method = parse_registered_name(text)
    except XlpeftError:
        refuse_composition(text)
        raise
    if pointer and pointer != "latest" and not pointer.isdigit():
        pointer = alias_version(text, pointer)
    return find_module(kind, name, method, pointer if pointer.isdigit() else None, fingerprint)


def refuse_composition(name: str) -> None:
    """Raise a clear error if ``name`` is a registered composition (MLflow Model), not a language or task module."""
    if not name.startswith("xlpeft-") or name.startswith(("xlpeft-lang-", "xlpeft-task-")):
        return
    versions = list_versions(name)
    if any(v.tags.get("xlpeft.kind") == "composition" for v in versions):
        raise XlpeftError(
            f"{name} is a registered composition (a whole composed model), not a language or task module; load it "
            f"with mlflow.pyfunc.load_model('models:/{name}@latest') or xlpeft.mlflow.load_model('models:/{name}@latest'),"
            " or pass a module name here (xlpeft-lang-<lang>-<method> or xlpeft-task-<task>-<method>)")


def alias_version(name: str, alias: str) -> str:
    """The version ``alias`` of registered model ``name`` points at.

    Raises:
        NotRegistered: the name is unknown; XlpeftError: the name has no such alias (its aliases are listed).
    """
    versions = list_versions(name)
    if not versions:
        raise NotRegistered(f"no registered model {name} in {tracking_uri()}; the registry holds: "
                            f"{', '.join(list_registered()) or 'nothing'}")
    for v in versions:
        if alias in v.aliases:
            return v.version
    held = ", ".join(f"@{a} (v{v.version})" for v in versions for a in v.aliases) or "none"
    raise XlpeftError(f"{name} has no alias {alias!r}; its aliases: {held}. Set one with "
                      f"`xlpeft promote {name} VERSION --alias {alias}`, or use {name}@VERSION or {name}@latest")


def promote(name: str, version: str, alias: str) -> RegisteredModule | None:
    """Point ``alias`` of registered model ``name`` (a module or a composition) at ``version``.

    Returns:
        The version the alias pointed at before, or None.

    Raises:
        XlpeftError: ``latest`` or another reserved or malformed alias, an unknown name (the registry's names
            are listed) or an unknown version (the name's versions are listed).
    """
    import re

    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise XlpeftError(f"the alias {alias!r} is reserved by MLflow ({name}@latest is always the newest version, "
                          f"{name}@N version N); pick another name such as production or staging")
    if not re.fullmatch(r"[\w-]{1,255}", alias):
        raise XlpeftError(f"an alias may hold only letters, digits, _ and -; got {alias!r} (e.g. production)")
    versions = list_versions(name)
    if not versions:
        raise NotRegistered(f"no registered model {name} in {tracking_uri()}; the registry holds: "
                            f"{', '.join(list_registered()) or 'nothing'} (see xlpeft modules)")
    target = next((v for v in versions if v.version == str(version)), None)
    if target is None:
        raise XlpeftError(f"{name} has no version {version!r}; its versions: "
                          f"{', '.join(v.version for v in reversed(versions))}")
    before = next((v for v in versions if alias in v.aliases), None)
    client().set_registered_model_alias(name, alias, target.version)
    return before

def download(chosen: RegisteredModule) -> tuple[Path, RegisteredModule]:
    """Fetch a registered module's artifacts into the local cache (once per run id).

    Raises:
        XlpeftError: the cache is not writable, or the version's artifacts are gone from the store.
    """
    from xlpeft.io import clean_stale
    from xlpeft.models import cache_dir

    target = cache_dir() / "registry" / chosen.run_id
    if not (target / "module" / "xlpeft.json").is_file():
        tmp = target.with_name(f".{chosen.run_id}.tmp-{os.getpid()}")
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(tmp.parent, ".")  # .<run>.tmp-<pid> of killed processes
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise XlpeftError(f"cannot write to the xlpeft cache {cache_dir()} ({exc.strerror}); registered modules "
                              "are downloaded there: set XLPEFT_CACHE to a writable directory") from None
        try:
            client().download_artifacts(chosen.run_id, "module", str(tmp))
            if not (tmp / "module" / "xlpeft.json").is_file():
                raise FileNotFoundError("module/xlpeft.json")
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if _transient(exc):
                raise XlpeftError(_unreachable(tracking_uri(), _reason(exc))) from None
            raise XlpeftError(
                f"registered module {chosen.name} version {chosen.version} (run {chosen.run_id}) has no readable "
                f"artifacts in {tracking_uri()} ({_reason(exc)[:160]}); they were deleted or moved: delete that "
                "version from the registry, or train the module again"
            ) from None
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target / "module", chosen
