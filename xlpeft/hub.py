"""Modules by Hugging Face Hub id: ``hf:ORG/REPO[@REVISION][:SUBDIR]`` wherever a module directory is accepted.

    xlpeft compose --lang sw --task ner --module hf:ORG/sw-domain-adapter
    xlpeft train-task --task ner --set lang_module=hf:ORG/lang-sw-adapter@v1
    xlpeft convert hf:AdapterHub/some-adapter DIR --from adapterhub --base mbert

Everything goes through ``huggingface_hub``'s own cache (``snapshot_download``): a revision (branch,
tag or commit) pins what is read, ``HF_HUB_OFFLINE=1`` reads the cache only, and a repo the cache lacks
while the hub is off or unreachable is one error line saying how to fetch it. Snapshots are read in
four layouts: an xlpeft module (``xlpeft.json``), an AdapterHub adapter (``adapter_config.json`` with
``config``), a peft adapter (``adapter_config.json`` with ``peft_type``) and a composable-sft SFT
(``pytorch_diff.bin``). Foreign layouts are converted with :func:`xlpeft.interop.convert` once per
(repo, commit, base) into ``<xlpeft cache>/hub/``; xlpeft snapshots are copied there too, because the
hub cache holds symlinks into its blob store, which :func:`xlpeft.io.load_module` refuses as files
outside the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xlpeft.errors import XlpeftError

PREFIX = "hf:"
LAYOUTS = ("xlpeft", "adapterhub", "peft", "composable-sft")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,254}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_BASE_KEYS = ("model_name", "base_model_name_or_path")  # AdapterHub's, peft's name for the base
_MARKERS = ("xlpeft.json", "pytorch_diff.bin", "adapter_config.json")


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf:ORG/REPO[@REVISION][:SUBDIR]`` (no revision: the repo's default branch)."""

    repo_id: str
    revision: str | None = None
    subdir: str = ""

    def __str__(self) -> str:
        return PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "") + (f":{self.subdir}" if self.subdir else "")


@dataclass(frozen=True)
class HubModule:
    """An xlpeft module directory made from a hub snapshot, and where it came from."""

    path: Path  # the xlpeft module directory (under the xlpeft cache)
    ref: HubRef  # as asked
    commit: str  # the snapshot's commit hash
    layout: str  # one of LAYOUTS

    @property
    def source(self) -> str:
        """The reference pinned to its commit: what a composition or lineage record should name."""
        return str(replace(self.ref, revision=self.commit))


def is_hub_ref(text: object) -> bool:
    return isinstance(text, str) and text.startswith(PREFIX)


def parse_hub_ref(text: str) -> HubRef:
    """``hf:ORG/REPO[@REVISION][:SUBDIR]`` as a :class:`HubRef`.

    Raises:
        XlpeftError: not that form (the message shows it and an example).
    """
    body = text[len(PREFIX):] if text.startswith(PREFIX) else text
    head, _, subdir = body.partition(":")
    repo, _, revision = head.partition("@")
    subdir = subdir.strip("/")
    parts = [p for p in subdir.split("/") if p]
    ok = (_REPO.fullmatch(repo) and ".." not in repo and (not revision or _REVISION.fullmatch(revision))
          and all(p not in (".", "..") for p in parts) and (not subdir or "\\" not in subdir))
    if not text.startswith(PREFIX) or not ok or (head.count("@") > 1):
        raise XlpeftError(f"expected a hub reference hf:ORG/REPO[@REVISION][:SUBDIR] (e.g. hf:AdapterHub/my-adapter@main); "
                          f"got {text!r}")
    return HubRef(repo, revision or None, "/".join(parts))


def hub_cache() -> Path:
    """``huggingface_hub``'s cache, read from the environment now (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it only once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.strip().lower() in ("1", "on", "yes", "true")


def transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's own errors (httpx2 under huggingface_hub 2.x, httpx under 1.x): a connection that failed."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def download(ref: HubRef) -> tuple[Path, str]:
    """The snapshot directory of ``ref`` (downloaded unless cached or offline) and its commit hash.

    Raises:
        XlpeftError: the cache lacks it and the hub is off or unreachable, the repo or revision does not
            exist (or needs a token), in one line with what to do.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown, cache, off = str(replace(ref, subdir="")), hub_cache(), offline()
    fetch = f"`hf download {ref.repo_id}" + (f" --revision {ref.revision}`" if ref.revision else "`")
    try:
        path = Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=str(cache),
                                      local_files_only=off, allow_patterns=[f"{ref.subdir}/*"] if ref.subdir else None))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if off else "the hub could not be reached"
        raise XlpeftError(f"{shown} is not in the Hugging Face cache ({cache}) and {why}; run once online "
                          f"(or {fetch}) to cache it, or pass a module directory instead") from None
    except GatedRepoError:
        raise XlpeftError(f"{shown} is gated: accept its terms on huggingface.co and log in (`hf auth login` or "
                          "HF_TOKEN), or pass a module directory") from None
    except RepositoryNotFoundError:
        raise XlpeftError(f"{shown}: no such repository on the hub (or it is private): check ORG/REPO, log in with "
                          "`hf auth login` for a private one, or pass a module directory") from None
    except RevisionNotFoundError:
        raise XlpeftError(f"{shown}: the repository has no revision {ref.revision!r}; give a branch, tag or "
                          "commit it has (or leave @REVISION out for its default branch)") from None
    except (HfHubHTTPError, OSError, ValueError, *transport_errors()) as exc:  # hub, connection, disk, bad ids
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise XlpeftError(f"could not fetch {shown} ({type(exc).__name__}: {first}); check the network, or run with "
                          f"HF_HUB_OFFLINE=1 to use the cache, or pass a module directory") from None
    commit = path.name if _COMMIT.fullmatch(path.name) else (ref.revision or "unknown")
    return path, commit


def detect_layout(path: Path) -> str:
    """Which of :data:`LAYOUTS` the directory holds.

    Raises:
        XlpeftError: none of them (names the files seen, and subfolders that hold a layout: use ``:SUBDIR``).
    """
    if (path / "xlpeft.json").is_file():
        return "xlpeft"
    if (path / "pytorch_diff.bin").is_file():
        return "composable-sft"
    if (path / "adapter_config.json").is_file():
        try:
            config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise XlpeftError(f"cannot read {path / 'adapter_config.json'}: {exc}") from None
        if isinstance(config, dict) and "peft_type" in config:
            return "peft"
        if isinstance(config, dict) and "config" in config:
            return "adapterhub"
        raise XlpeftError(f"{path / 'adapter_config.json'} is neither AdapterHub's (a 'config' key) nor peft's "
                          "(a 'peft_type' key); convert it with the library that wrote it")
    entries = sorted(path.iterdir()) if path.is_dir() else []
    seen = [p.name for p in entries]
    inner = [p.name for p in entries if p.is_dir() and any((p / f).is_file() for f in _MARKERS)]
    hint = f"; these subfolders hold one, name it as :SUBDIR: {', '.join(inner)}" if inner else ""
    raise XlpeftError(f"{path} holds no xlpeft module (xlpeft.json), AdapterHub or peft adapter (adapter_config.json) "
                      f"or composable-sft SFT (pytorch_diff.bin); found {', '.join(seen[:12]) or 'nothing'}{hint}")


def snapshot_dir(ref: str | HubRef) -> tuple[Path, HubRef, str, str]:
    """(the snapshot's folder for ``ref`` (its SUBDIR), the parsed ref, the commit, the layout there)."""
    ref = parse_hub_ref(ref) if isinstance(ref, str) else ref
    root, commit = download(ref)
    path = root / ref.subdir if ref.subdir else root
    if ref.subdir and not path.is_dir():
        raise XlpeftError(f"{ref}: the snapshot (commit {commit[:12]}) has no folder {ref.subdir!r}; "
                          f"it holds {', '.join(sorted(p.name for p in root.iterdir())[:12])}")
    return path, ref, commit, detect_layout(path)


def named_base(path: Path, layout: str) -> str | None:
    """The base a foreign config names (AdapterHub ``model_name``, peft ``base_model_name_or_path``), if any."""
    if layout not in ("adapterhub", "peft"):
        return None
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    found = next((config.get(k) for k in _BASE_KEYS if isinstance(config.get(k), str) and config.get(k)), None)
    return found


def hub_module(ref: str | HubRef, base: Any = None, fingerprint: str | None = None) -> HubModule:
    """Resolve ``ref`` to an xlpeft module directory, converting a foreign layout once per (repo, commit, base).

    Args:
        ref: ``hf:ORG/REPO[@REVISION][:SUBDIR]``.
        base: the base a foreign layout is converted against (a :class:`~xlpeft.models.Base` or a name);
            not needed for xlpeft snapshots.
        fingerprint: with no ``base``, the base fingerprint the caller composes on: an earlier conversion
            for it is reused, else the base the foreign config names is loaded and must match it.

    Raises:
        XlpeftError: the hub errors of :func:`download`, an unknown layout, or a foreign layout with no base to
            convert it against.
    """
    from xlpeft import models

    src, ref, commit, layout = snapshot_dir(ref)
    home = models.cache_dir() / "hub" / ref.repo_id.replace("/", "--") / commit / (ref.subdir.replace("/", "--") or "_")
    if layout == "xlpeft":
        return HubModule(install(home / "xlpeft", lambda out: shutil.copytree(src, out)), ref, commit, layout)
    if base is None:
        base = _base_for(ref, src, layout, home, fingerprint)
        if isinstance(base, Path):
            return HubModule(base, ref, commit, layout)
    if isinstance(base, str | Path):
        base = models.load_base(str(base))
    from xlpeft.interop import convert

    # the language/task to record: the folder's name, else (AdapterHub records its own) the repo's name
    name = ref.subdir.rsplit("/", 1)[-1] if ref.subdir else (None if layout == "adapterhub" else ref.repo_id.split("/")[1])
    out = install(home / base.fingerprint, lambda out: convert(src, out, layout, base=base, name=name))
    return HubModule(out, ref, commit, layout)


def _base_for(ref: HubRef, src: Path, layout: str, home: Path, fingerprint: str | None) -> Any:
    """With no base given: an earlier conversion for ``fingerprint`` (a Path), or the base the config names."""
    from xlpeft import models

    if fingerprint and (home / fingerprint / "xlpeft.json").is_file():
        return home / fingerprint
    named = named_base(src, layout)
    fix = (f"convert it once: `xlpeft convert {ref} DIR --from {layout} --base BASE` and pass DIR, or give "
           "the base to the command")
    if named is None:
        raise XlpeftError(f"{ref} is a {layout} module, which is converted against its base, and none was given; {fix}")
    base = models.load_base(named)
    if fingerprint and base.fingerprint != fingerprint:
        raise XlpeftError(f"{ref} is a {layout} module for base {named!r} (fingerprint {base.fingerprint}), but the "
                          f"base here has fingerprint {fingerprint}; {fix}")
    return base


def install(target: Path, write) -> Path:
    """Make ``target`` once, atomically: ``write(tmp)`` fills a fresh sibling folder, renamed into place.

    A concurrent writer that wins the rename leaves its copy, which is as good as ours.
    """
    from xlpeft.io import MANIFEST, disk_error

    if (target / MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp / "module")
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # a crash between mkdir and rename elsewhere left it empty
        try:
            os.rename(tmp / "module", target)
        except OSError:
            if not (target / MANIFEST).is_file():
                raise
    except OSError as exc:
        raise XlpeftError(disk_error(exc, f"could not write {target} in the xlpeft cache ($XLPEFT_CACHE)")) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_hub(ref: str | HubRef, base: Any = None, fingerprint: str | None = None) -> Path:
    """The xlpeft module directory for ``ref`` (see :func:`hub_module`)."""
    return hub_module(ref, base, fingerprint).path


__all__ = ["HubModule", "HubRef", "LAYOUTS", "detect_layout", "hub_module", "is_hub_ref", "parse_hub_ref", "resolve_hub"]
