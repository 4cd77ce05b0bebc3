"""Which registered modules a command uses, all found through :func:`xlpeft.tracking.find_module`.

* a language or task module by name (newest, of one method or of any), as a composition leaf;
* the language module a task module trains over (``--set lang_module=auto|none|PATH|NAME[@ALIAS]``);
* the zero-shot baseline's source-language module: the task module's *recorded* parent, never a
  fresh lookup (which could return a module registered later, or one of another method);
* the newest module of every method for a language or task (the transfer matrix's rows and columns).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

from xlpeft import tracking
from xlpeft.compose import ModuleRef
from xlpeft.composed import COMPOSITION_FILE
from xlpeft.errors import XlpeftError
from xlpeft.io import MANIFEST, LoadedModule, load_module
from xlpeft.registry import method_names


def registered_ref(kind: str, name: str, method: str | None,
                   fingerprint: str) -> tuple[ModuleRef, tracking.RegisteredModule]:
    """The newest registered ``kind`` module for ``name`` (of ``method``, or of any), loaded, as a composition leaf.

    The leaf's source is ``NAME@VERSION``, so a composition record names the registry entry, not a cache path.

    Raises:
        NotRegistered: nothing matches (the message lists what the registry holds);
        XlpeftError: the artifacts are gone, or the module there is of another kind.
    """
    path, reg = tracking.find_module(kind, name, method, fingerprint=fingerprint)
    module = load_module(path).expect_kind(kind, f"registered module {reg.name} version {reg.version}")
    return ModuleRef.of(module, f"{reg.name}@{reg.version}"), reg


def newest_language_module(lang: str, fingerprint: str,
                           method: str) -> tuple[Path, tracking.RegisteredModule, bool] | None:
    """The language module ``lang_module=auto`` trains over: ``(path, version, same method?)``.

    The newest one of the task module's own method first, as the recipes pair them (MAD-X: a
    task adapter over a language adapter, Pfeiffer et al., 2020; LT-SFT: a task delta over a
    language delta, Ansell et al., 2022); only if there is none, the newest of another method.
    """
    for wanted in (method, None):  # None: the newest of any method, so of another one (none of ``method``)
        try:
            path, reg = tracking.find_module("language", lang, wanted, fingerprint=fingerprint)
        except tracking.NotRegistered:  # not "its artifacts are gone": that one is reported
            continue
        return path, reg, wanted is not None
    return None


def language_module_for_task(setting: str, lang: str, base, method: str) -> tuple[LoadedModule | None, dict[str, Any]]:
    """The language module to activate under a ``method`` task module, and its lineage for the manifest.

    Args:
        setting: ``auto`` (the newest registered for ``lang`` on this base, see :func:`newest_language_module`),
            ``none``, a module directory, a registered name (``NAME``, ``NAME@VERSION``, ``NAME@ALIAS``) or a
            hub id (``hf:ORG/REPO[@REVISION][:SUBDIR]``, :mod:`xlpeft.hub`; converted against ``base`` if foreign).

    With ``auto``, says on stderr which registered module it picked and why.

    Raises:
        XlpeftError: nothing registered for ``lang`` on this base, or the module is not a language module.
    """
    if setting == "none":
        return None, {}
    if setting.startswith("xlpeft-") and not Path(setting).is_dir():  # NAME, NAME@VERSION or NAME@ALIAS
        path, reg = tracking.find_reference(setting, base.fingerprint)
        module = load_module(path).expect_kind("language", "--set lang_module")
        return module, {"registered_name": reg.name, "version": reg.version, "run_id": reg.run_id,
                        "lang": module.manifest.lang, "method": module.manifest.method, "picked": setting}
    if setting.startswith("hf:") and not Path(setting).is_dir():  # hf:ORG/REPO[@REVISION][:SUBDIR]
        from xlpeft.hub import hub_module

        hub = hub_module(setting, base)
        module = load_module(hub.path).expect_kind("language", "--set lang_module")
        # "path" names it in tags and messages: the reference pinned to its commit, which the baseline resolves again
        return module, {"hub": hub.source, "path": hub.source, "layout": hub.layout, "lang": module.manifest.lang,
                        "method": module.manifest.method, "picked": setting}
    if setting != "auto":
        module = load_module(setting).expect_kind("language", "--set lang_module")
        # the manifest's hash names which save of the directory it was (it holds the save time), so a
        # task run over a retrained module at the same path does not log the same params
        stamp = hashlib.sha256((Path(setting) / MANIFEST).read_bytes()).hexdigest()[:16]
        return module, {"path": str(Path(setting).resolve()), "lang": module.manifest.lang,
                        "method": module.manifest.method, "manifest_sha256": stamp}
    hit = newest_language_module(lang, base.fingerprint, method)
    if hit is None:
        raise XlpeftError(
            f"no registered language module for {lang!r} on base {base.name!r} ({base.fingerprint}) in "
            f"{tracking.tracking_uri()}; train one with `xlpeft train-lang --lang {lang} --base {base.name}`, "
            "or pass --set lang_module=PATH or --set lang_module=none"
        )
    path, reg, same = hit
    why = (f"the {method} language module, as the recipe pairs them" if same else
           f"no {method} language module for {lang!r} on this base, so the newest of another method "
           f"({reg.tags.get('xlpeft.method', '?')}); train one with `xlpeft train-lang --lang {lang} "
           f"--method {method}` or pass --set lang_module=PATH to choose")
    print(f"lang_module=auto: {reg.name} version {reg.version} ({why})", file=sys.stderr, flush=True)
    module = load_module(path).expect_kind("language", "the registered language module")
    return module, {"registered_name": reg.name, "version": reg.version, "run_id": reg.run_id,
                    "lang": module.manifest.lang, "method": module.manifest.method,
                    "picked": "same method" if same else "other method (none of the same method)"}


def baseline_language_module(task: LoadedModule, fingerprint: str) -> LoadedModule | None:
    """The source-language module the task module was trained over: its recorded parent, never a fresh lookup.

    A lookup ("newest English module") could return a module registered after the task module
    was trained, or one of another method, and the baseline would no longer be the model that
    was trained. None when the task module was trained without one, or its parent is gone.
    """
    lineage = task.manifest.extra.get("lang_module") or {}
    if not isinstance(lineage, dict):
        raise XlpeftError(f"task module {task.path}: its manifest's extra.lang_module should be the record of the "
                          f"language module it was trained over (a mapping) or null; got {str(lineage)[:80]!r}")
    if lineage.get("registered_name") and lineage.get("version"):  # without a version it would be a fresh lookup
        kind, name, method = tracking.parse_registered_name(lineage["registered_name"])
        try:
            path, _ = tracking.find_module(kind, name, method, version=lineage.get("version"), fingerprint=fingerprint)
            return load_module(path)
        except tracking.NotRegistered:  # deleted from the registry since: try the directory it was read from
            pass
    if lineage.get("path") and Path(lineage["path"]).is_dir():
        return load_module(lineage["path"])
    if lineage.get("hub"):  # a hub module: its pinned commit, from the cache (converted there for this base)
        from xlpeft.hub import resolve_hub

        try:
            return load_module(resolve_hub(lineage["hub"], fingerprint=fingerprint))
        except XlpeftError:  # the hub is off and the cache lacks it: no baseline, as for a deleted parent
            return None
    return None


def baseline_stack(task: LoadedModule, fingerprint: str) -> list[LoadedModule]:
    """The zero-shot reference of MAD-X (Pfeiffer et al., 2020): the task module over its source-language module.

    Just the task module when that language module can no longer be found.
    """
    source = baseline_language_module(task, fingerprint)
    return [task] if source is None else [source, task]


def registered_by_method(kind: str, name: str, fingerprint: str) -> dict[str, LoadedModule]:
    """The newest registered ``kind`` module for ``name`` of every method that has one, keyed by method.

    Raises:
        XlpeftError: a registered version's artifacts are gone, or the store is unreachable.
    """
    found = {}
    for method in method_names():
        try:
            path, _ = tracking.find_module(kind, name, method, fingerprint=fingerprint)
        except tracking.NotRegistered:
            continue
        found[method] = load_module(path)
    return found


def modules_under(directory: str | Path, fingerprint: str) -> tuple[list[LoadedModule], list[str]]:
    """Every xlpeft module saved under ``directory`` (any depth) for the base ``fingerprint``, in path order.

    Returns:
        (the modules, one line per module skipped because it was trained on another base).

    Raises:
        XlpeftError: ``directory`` is not a folder, or holds no module at all.
    """
    root = Path(directory)
    if not root.is_dir():
        raise XlpeftError(f"--modules-dir {directory}: expected a folder of saved modules; it is not a folder")
    found, other = [], []
    for manifest in sorted(root.rglob(MANIFEST)):
        if any((parent / COMPOSITION_FILE).is_file() for parent in manifest.parents if parent.is_relative_to(root)):
            continue  # a module inside a saved composed model: a copy of one trained elsewhere
        module = load_module(manifest.parent)
        if module.manifest.base.get("fingerprint") != fingerprint:
            other.append(f"{manifest.parent}: trained on base {module.manifest.base.get('name', '?')} "
                         f"({module.manifest.base.get('fingerprint')})")
            continue
        found.append(module)
    if not found:
        why = f" ({len(other)} on another base, e.g. {other[0]})" if other else ""
        raise XlpeftError(f"--modules-dir {directory}: no xlpeft module for this base ({fingerprint}) under it{why}")
    return found, other
