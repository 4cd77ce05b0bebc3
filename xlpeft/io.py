"""Module directories: ``xlpeft.json`` manifest + ``.safetensors`` files. No pickle anywhere.

A directory is written under a temporary name and renamed into place, so a crash never
leaves a half-written module where a complete one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
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

    def check_base(self, fingerprint: str, force: bool = False) -> None:
        """Refuse to use this module on a base with other weights unless ``force``."""
        mine = self.manifest.base["fingerprint"]
        if mine != fingerprint and not force:
            raise XlpeftError(
                f"module {self.path} was trained on base {self.manifest.base.get('name')!r} "
                f"(fingerprint {mine}) but the base in use has fingerprint {fingerprint}; "
                "use the same base, or force it if you know the weights are compatible"
            )


def save_module(out_dir: str | Path, manifest: Manifest, tensors: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write a module directory atomically; ``tensors`` maps a file stem (e.g. ``adapter``) to a state dict."""
    from xlpeft import __version__

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
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
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise XlpeftError(f"{path} is not an xlpeft module: no {MANIFEST} in it")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise XlpeftError(f"{mpath} is not valid JSON ({exc}); the module is corrupted, retrain or re-download it") from None
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise XlpeftError(f"{mpath} has format_version {version!r}; this xlpeft reads version {FORMAT_VERSION}")
    known = set(Manifest.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise XlpeftError(f"{mpath} has unknown keys {sorted(unknown)}; it was written by a newer xlpeft?")
    try:
        return Manifest(**raw)
    except TypeError as exc:
        raise XlpeftError(f"{mpath} is incomplete: {exc}") from None


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
