"""Every shipped YAML loads with the project's loaders, and the NER demo sample is well formed.

The rows come from globs over the checkout: a new language pack, task pack, pipeline or sample
file is a new row with nothing to register. No network: hub sources are parsed, never fetched.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from xlpeft.cli import cli
from xlpeft.data.corpora import check_text_file
from xlpeft.data.tasks import check_labels, read_conll, read_source
from xlpeft.packs import load_language_pack, load_task_pack
from xlpeft.pipelines import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
LANGUAGE_PACKS = sorted(ROOT.glob("language_packs/*/pack.yaml"))
TASK_PACKS = sorted(ROOT.glob("task_packs/*/pack.yaml"))
PIPELINES = sorted(ROOT.glob("pipelines/*.yaml"))
NER_SAMPLE = sorted(ROOT.glob("task_packs/ner/sample/*.conll"))
COMMAND = re.compile(r"\bxlpeft ([a-z][a-z-]*)")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.fixture(autouse=True)
def _packs_from_this_checkout(monkeypatch):
    """Packs are looked up in $XLPEFT_PACKS first: point it here so the working directory does not matter."""
    monkeypatch.setenv("XLPEFT_PACKS", str(ROOT))


def test_the_globs_find_what_is_shipped():
    # An empty glob would parametrise to nothing and pass silently.
    assert LANGUAGE_PACKS and TASK_PACKS and PIPELINES and NER_SAMPLE


@pytest.mark.parametrize("path", LANGUAGE_PACKS + TASK_PACKS + PIPELINES, ids=_rel)
def test_yaml_opens_with_the_command_that_uses_it(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    header = list(itertools.takewhile(lambda line: line.startswith("#"), lines))
    assert header, f"{_rel(path)} should start with a comment line giving the command that uses it"
    # Prose may say "xlpeft developers": what counts is that at least one real command is named.
    named = [m.group(1) for line in header for m in COMMAND.finditer(line)]
    assert set(named) & set(cli.commands), (
        f"{_rel(path)}: the header comment should name the command that uses it, e.g. `xlpeft train-lang --lang xx`; "
        f"found {named or 'none'}, known commands: {sorted(cli.commands)}"
    )


@pytest.mark.parametrize("path", LANGUAGE_PACKS, ids=_rel)
def test_language_pack_loads_and_its_local_corpora_are_utf8_text(path):
    pack = load_language_pack(path.parent.name)
    assert pack.path.resolve() == path.parent.resolve()
    for spec in pack.corpora.values():
        if spec.path is not None:  # hub corpora are left alone: no network in tests
            check_text_file(Path(spec.path))  # raises on a missing, empty, binary or non-UTF-8 file


@pytest.mark.parametrize("path", TASK_PACKS, ids=_rel)
def test_task_pack_loads_and_its_local_files_read(path):
    pack = load_task_pack(path.parent.name)
    assert pack.path.resolve() == path.parent.resolve()
    assert len(set(pack.labels)) == len(pack.labels), f"{_rel(path)}: duplicate labels in {pack.labels}"
    for splits in pack.sources.values():
        for source in splits.values():
            if source.path is not None:  # hub sources are left alone: no network in tests
                read_source(source, pack.head, list(pack.labels))  # parses and checks every label


@pytest.mark.parametrize("path", PIPELINES, ids=_rel)
def test_pipeline_loads_and_names_real_commands(path):
    steps = load_pipeline(path).steps
    unknown = sorted({step.args[0] for step in steps} - set(cli.commands))
    assert not unknown, f"{_rel(path)}: steps use unknown commands {unknown}; known: {sorted(cli.commands)}"


@pytest.mark.parametrize("path", PIPELINES, ids=_rel)
def test_pipeline_variables_each_have_a_comment(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    block = list(itertools.takewhile(lambda line: line.startswith("  ") or not line.strip(),
                                     lines[lines.index("vars:") + 1:])) if "vars:" in lines else []
    bare = [line.split(":")[0].strip() for line in block if line.strip() and "#" not in line]
    assert not bare, f"{_rel(path)}: variables {bare} have no comment saying what they are"
    assert len([line for line in block if line.strip()]) == len(load_pipeline(path).variables)


@pytest.mark.parametrize("path", PIPELINES, ids=_rel)
def test_pipeline_dry_run_works_offline(path, tmp_path, monkeypatch, capsys):
    from tests.conftest import use_store
    from tests.hostile.conftest import run_cli

    use_store(monkeypatch, tmp_path)  # an empty store: nothing is done, nothing is loaded
    outcome = run_cli(capsys, "run", str(path), "--dry-run")
    assert outcome.code == 0, outcome.err
    assert sum(line.startswith("[") for line in outcome.out.splitlines()) == len(load_pipeline(path).steps)


def iob2_errors(tags: tuple[str, ...] | list[str]) -> list[str]:
    """Where an ``I-X`` does not continue a ``B-X``/``I-X`` (IOB2: every entity opens with ``B-``)."""
    errors = []
    for i, tag in enumerate(tags):
        if tag.startswith("I-"):
            previous = tags[i - 1] if i else "O"
            if previous == "O" or previous[2:] != tag[2:]:
                errors.append(f"token {i + 1}: {tag} after {previous if i else 'the sentence start'}")
    return errors


@pytest.mark.parametrize(
    "tags, n_errors",
    [
        (["B-PER", "I-PER", "I-PER", "O", "B-LOC"], 0),
        (["B-LOC", "B-LOC", "I-LOC"], 0),
        (["I-PER", "O"], 1),
        (["O", "I-LOC"], 1),
        (["B-ORG", "I-LOC"], 1),
        (["B-PER", "O", "I-PER", "I-ORG"], 2),
    ],
)
def test_iob2_errors(tags, n_errors):
    assert len(iob2_errors(tags)) == n_errors


@pytest.mark.parametrize("path", NER_SAMPLE, ids=_rel)
def test_ner_sample_is_tab_separated_known_labels_and_iob2(path):
    bad_lines = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if line and (line.count("\t") != 1 or line != line.strip())]
    assert not bad_lines, f"{_rel(path)}: lines {bad_lines[:5]} are not `token<TAB>tag`"
    examples = read_conll(path)
    assert examples, f"{_rel(path)} holds no sentences"
    check_labels(examples, list(load_task_pack("ner").labels), _rel(path))
    for n, example in enumerate(examples, 1):
        errors = iob2_errors(example.tags)
        assert not errors, f"{_rel(path)} sentence {n} ({' '.join(example.tokens)}): {'; '.join(errors)}"


def test_offline_corpus_is_the_packs_bible_else_its_default(tmp_path, monkeypatch):
    from xlpeft.errors import XlpeftError
    from xlpeft.packs import language_pack

    monkeypatch.setenv("XLPEFT_CACHE", str(tmp_path))
    with pytest.raises(XlpeftError, match="run `xlpeft prepare-data bible`"):  # not written yet: says how
        load_language_pack("tr").resolve(["offline"])
    (tmp_path / "corpora" / "bible").mkdir(parents=True)
    (tmp_path / "corpora" / "bible" / "t.txt").write_text("Başlangıçta Tanrı göğü ve yeri yarattı.\n", encoding="utf-8")
    (tr,) = load_language_pack("tr").resolve(["offline"])
    assert tr.path == str(tmp_path / "corpora" / "bible" / "t.txt")  # the Bible text prepare-data bible writes
    (km,) = load_language_pack("km").resolve(["offline"])  # no Bible: the pack's default (UDHR)
    assert km.path == str(load_language_pack("km").resolve(None)[0].path)
    with pytest.raises(XlpeftError, match="--corpus offline: qu .Quechua. has no language pack"):
        language_pack("qu").resolve(["offline"])
