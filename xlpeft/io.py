"""Module directories: ``xlpeft.json`` manifest + ``.safetensors`` files. No pickle anywhere.

A directory is written under a temporary name and renamed into place, so a crash never
leaves a half-written module where a complete one is expected.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from xlpeft.errors import XlpeftError

FORMAT_VERSION = 1
MANIFEST = "xlpeft.json"
KINDS = ("language", "task", "composition")


@dataclass(frozen=True)
class Manifest:
    """What a module is, what it was trained on, and how to rebuild it."""

    kind: str  # language | task | composition
    method: str  # adapter | sft | ...
    base: dict[str, str]  # name, fingerprint, model_type
    config: dict[str, Any]  # the method config, as a dict
    lang: str | None = None
    task: str | None = None
    trainable_parameters: int = 0
    training: dict[str, Any] = field(default_factory=dict)  # steps, losses, seed, corpus, ...
    extra: dict[str, Any] = field(default_factory=dict)  # labels, head, lang_module, ...
    files: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    created: str = ""
    xlpeft_version: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise XlpeftError(f"manifest kind should be one of {', '.join(KINDS)}; got {self.kind!r}")
        if not self.base.get("fingerprint"):
            raise XlpeftError("manifest has no base fingerprint; the module cannot be checked against a base")


@dataclass
class LoadedModule:
    """A module read from disk: its manifest and tensors per file (file stem -> name -> tensor)."""

    manifest: Manifest
    tensors: dict[str, dict[str, torch.Tensor]]
    path: Path

    def expect_kind(self, kind: str, role: str) -> LoadedModule:
        """Refuse a module of another kind where ``role`` needs a ``kind`` module (e.g. a task module as lang_module)."""
        if self.manifest.kind != kind:
            raise XlpeftError(f"{self.path} is an xlpeft {self.manifest.kind} module, but {role} needs a {kind} module; "
                              f"pass a directory written by xlpeft train-{'lang' if kind == 'language' else kind}")
        return self

    def check_base(self, fingerprint: str, force: bool = False) -> None:
        """Refuse to use this module on a base with other weights unless ``force``."""
        mine = self.manifest.base["fingerprint"]
        if mine != fingerprint and not force:
            raise XlpeftError(
                f"module {self.path} was trained on base {self.manifest.base.get('name')!r} "
                f"(fingerprint {mine}) but the base in use has fingerprint {fingerprint}; "
                "use the same base, or force it if you know the weights are compatible"
            )


def _holds_cwd(path: Path) -> bool:
    cwd = Path.cwd().resolve()
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home directory known
        home = None
    return path == cwd or path in cwd.parents or path == home


def check_output_dir(dst: str | Path, marker: str, what: str, label: str = "--output") -> Path:
    """The one ``--output`` policy: ``dst`` may be new, empty, or an earlier output holding ``marker``.

    Writing an output replaces ``dst`` as a whole, so anything else there (a user's directory, a
    file, the working directory or one above it) is refused before any work starts.

    Returns:
        ``dst`` resolved (so ``.`` has a name to rename).

    Raises:
        XlpeftError: ``dst`` holds something that is not ``what``.
    """
    raw = str(dst)
    if not raw.strip():
        raise XlpeftError(f"{label} is empty; give a new directory, e.g. --output modules/my-module")
    path = Path(os.path.expanduser(raw)).resolve()
    shown = brief(raw)
    if _holds_cwd(path):
        raise XlpeftError(f"{label} {shown} is the working directory, one above it or your home directory; "
                          f"xlpeft replaces the output directory as a whole, so give a new one, e.g. {shown}/module")
    if path.exists() and not path.is_dir():
        raise XlpeftError(f"{label} {shown} is an existing file, not a directory; xlpeft will not replace it: "
                          "choose a new directory")
    if path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise XlpeftError(f"{label} {shown} is a non-empty directory that is not {what} (no {marker} in it); "
                          "xlpeft never deletes other files: choose a new or empty directory")
    return path


def check_module_output(dst: str | Path, kind: str, overwrite: bool = False) -> Path:
    """``--output`` of a training command: new, empty, or an earlier xlpeft ``kind`` module (replaced).

    An xlpeft module of another kind is replaced only with ``--overwrite``; anything that is not an
    xlpeft module never is. The parent must be writable. Checked before the base is loaded.
    """
    path = check_output_dir(dst, MANIFEST, "an xlpeft module")
    if (path / MANIFEST).is_file():
        try:
            found = read_manifest(path).kind
        except XlpeftError:
            found = "unreadable"
        if found != kind and not overwrite:
            raise XlpeftError(f"--output {brief(str(dst))} holds an xlpeft {found} module, not a {kind} module; "
                              "pass --overwrite to replace it, or choose another directory")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise XlpeftError(f"--output {brief(str(dst))}: cannot write in {parent} (permission denied); "
                          "choose a directory you can write to")
    return path


def non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinite value."""
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(where: Path | str, tensors: dict[str, dict[str, torch.Tensor]], action: str) -> None:
    """Refuse NaN or infinite weights: such a module scores nothing and must not be saved or used."""
    bad = non_finite((f"{stem}/{key}", t) for stem, state in tensors.items() for key, t in state.items())
    if bad:
        raise XlpeftError(f"{action} {where}: non-finite (NaN or infinite) values in {len(bad)} tensor(s), e.g. "
                          f"{', '.join(bad[:3])}; the training diverged (lower the learning rate) or the file is corrupted")


def disk_error(exc: OSError, what: str) -> str:
    """One line for an OS error while writing; a full disk says so."""
    if exc.errno == errno.ENOSPC:
        return f"{what}: no space left on the device; free some space and run the command again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}: permission denied ({exc.filename or 'read-only location'}); choose a writable directory"
    return f"{what}: {exc.strerror or exc}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def clean_stale(directory: Path, prefix: str, max_age: float = 3600.0) -> None:
    """Remove temporaries ``<prefix>...(.tmp-|.old-)<pid>...`` left by a killed process (pid no longer alive).

    Names without a pid (written by xlpeft 0.1) are removed once older than ``max_age`` seconds.
    """
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        found = re.search(r"\.(?:tmp|old)-(\d*)", entry.name)
        if not entry.name.startswith(prefix) or found is None:
            continue
        if found.group(1):
            pid = int(found.group(1))
            stale = pid != os.getpid() and not _pid_alive(pid)
        else:
            try:
                stale = time.time() - entry.stat().st_mtime > max_age
            except OSError:
                continue
        if stale:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def brief(value: object, limit: int = 120) -> str:
    """A user value for a message, cut to ``limit`` characters: messages never carry unbounded data."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def save_module(out_dir: str | Path, manifest: Manifest, tensors: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write a module directory atomically; ``tensors`` maps a file stem (e.g. ``adapter``) to a state dict."""
    from xlpeft import __version__

    out_dir = check_output_dir(out_dir, MANIFEST, "an xlpeft module")  # never replaces anything else
    check_finite(out_dir, tensors, "not saving module")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir.parent, f".{out_dir.name}.tmp-")
    clean_stale(out_dir.parent, f".{out_dir.name}.old-")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    except OSError as exc:
        raise XlpeftError(disk_error(exc, f"cannot create the module directory next to {out_dir}")) from None
    tmp.chmod(0o755)  # mkdtemp makes it private; a module directory is meant to be shared
    try:
        files = []
        for stem, state in tensors.items():
            name = f"{stem}.safetensors"
            contiguous = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
            save_file(contiguous, str(tmp / name), metadata={"format": "xlpeft", "version": str(FORMAT_VERSION)})
            files.append(name)
        stamped = Manifest(
            **{**asdict(manifest), "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "xlpeft_version": __version__}
        )
        (tmp / MANIFEST).write_text(json.dumps(asdict(stamped), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _swap_into(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise XlpeftError(disk_error(exc, f"could not write module {out_dir}")) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap_into(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``, replacing an earlier output there only once ``tmp`` is complete."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def install_dir(src: Path, out_dir: Path, marker: str, what: str) -> Path:
    """Copy the finished directory ``src`` to ``out_dir`` atomically (same policy as :func:`check_output_dir`)."""
    out_dir = check_output_dir(out_dir, marker, what)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir.parent, f".{out_dir.name}.")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        _swap_into(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise XlpeftError(disk_error(exc, f"could not write {out_dir}")) from None
    return out_dir


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise XlpeftError(f"{path} is not an xlpeft module: no {MANIFEST} in it")
    try:
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise XlpeftError(f"{mpath} is {mpath.stat().st_size} bytes; a manifest is a few kB: the module is corrupted")
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise XlpeftError(f"{mpath} is not valid JSON ({brief(str(exc))}); the module is corrupted, retrain or re-download it") from None
    except RecursionError:
        raise XlpeftError(f"{mpath} is nested too deeply to be a manifest; the module is corrupted") from None
    if not isinstance(raw, dict):
        raise XlpeftError(f"{mpath} should hold a JSON object; got a JSON {type(raw).__name__}: the module is corrupted")
    check_manifest_types(mpath, raw)
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise XlpeftError(f"{mpath} has format_version {version!r}; this xlpeft reads version {FORMAT_VERSION}")
    known = set(Manifest.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise XlpeftError(f"{mpath} has unknown keys {brief(sorted(unknown))}; it was written by a newer xlpeft?")
    try:
        return Manifest(**raw)
    except TypeError as exc:
        raise XlpeftError(f"{mpath} is incomplete: {exc}") from None


MAX_MANIFEST_BYTES = 16 << 20
_MANIFEST_TYPES = {"kind": str, "method": str, "base": dict, "config": dict, "lang": (str, type(None)),
                   "task": (str, type(None)), "trainable_parameters": int, "training": dict, "extra": dict,
                   "files": list, "format_version": int, "created": str, "xlpeft_version": str}


def check_manifest_types(mpath: Path, raw: dict[str, Any]) -> None:
    """Each known manifest key has its JSON type; ``base`` maps strings to strings; ``files`` lists names."""
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
    for key, want in _MANIFEST_TYPES.items():
        if key in raw and (not isinstance(raw[key], want) or isinstance(raw[key], bool)):
            wanted = names.get(want, "a string or null")
            raise XlpeftError(f"{mpath}: `{key}` should be {wanted}; got {brief(raw[key], 60)}: the module is corrupted")
    if not all(isinstance(v, str) for v in raw.get("base", {}).values()):
        raise XlpeftError(f"{mpath}: `base` should map name, fingerprint and model_type to strings; the module is corrupted")
    if not all(isinstance(f, str) for f in raw.get("files", [])):
        raise XlpeftError(f"{mpath}: `files` should list file names; the module is corrupted")


def load_module(path: str | Path) -> LoadedModule:
    """Load and validate a module directory (manifest, file list, safetensors only)."""
    path = Path(path)
    manifest = read_manifest(path)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    root = path.resolve()
    for name in manifest.files:
        fpath = (path / name).resolve()
        if root not in fpath.parents or not name.endswith(".safetensors"):
            raise XlpeftError(f"{path / MANIFEST} lists file {name!r} outside the module or not .safetensors; refusing it")
        if not fpath.is_file():
            raise XlpeftError(f"module {path} lists {name} but the file is missing; the module is incomplete")
        try:
            tensors[name.removesuffix(".safetensors")] = load_file(str(fpath))
        except Exception as exc:  # safetensors raises its own error types for truncation/corruption
            raise XlpeftError(f"cannot read {fpath}: {exc}; the file is corrupted, retrain or re-download it") from None
    check_dtypes(path, tensors)
    check_finite(path, tensors, "refusing module")
    return LoadedModule(manifest=manifest, tensors=tensors, path=path)


def check_dtypes(path: Path, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Weights must be floating point and sparse indices int64; anything else is a corrupted or foreign file."""
    bad = []
    for stem, state in tensors.items():
        for key, tensor in state.items():
            want_int = key.endswith(".indices")
            if (want_int and tensor.dtype != torch.int64) or (not want_int and not tensor.is_floating_point()):
                bad.append(f"{stem}/{key} is {tensor.dtype}")
    if bad:
        raise XlpeftError(f"module {path} has tensors of the wrong dtype ({'; '.join(bad[:5])}); "
                          "weights should be floating point and sparse indices int64")
