"""Modules by hub id (``hf:ORG/REPO``) through huggingface_hub's real cache code, offline; the push plan and card.

Each test builds the hub cache layout itself in a temporary ``HF_HOME`` (``models--ORG--REPO/{blobs,
refs/<branch>, snapshots/<commit>/...}``, files as symlinks into ``blobs`` as huggingface_hub writes
them) with ``HF_HUB_OFFLINE=1``, so ``snapshot_download`` resolves it without a network. The repos hold
the committed home-library fixtures (AdapterHub's own files) and xlpeft's own exports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import xlpeft
from tests.interop.conftest import FIXTURES, TOLERANCE, base_dir, expected, max_diff
from xlpeft.cli import cli
from xlpeft.errors import XlpeftError
from xlpeft.hub import HubRef, hub_module, parse_hub_ref
from xlpeft.hub_card import citations, hub_base_id, model_card
from xlpeft.interop import convert
from xlpeft.io import load_module
from xlpeft.models import load_base

C1, C2 = "1" * 40, "2" * 40  # commit hashes


def cache_repo(hf_home: Path, repo_id: str, src: Path, commit: str, refs: tuple[str, ...] = ("main",),
               under: str = "") -> Path:
    """Lay ``src``'s files out as huggingface_hub caches a snapshot; returns the snapshot folder."""
    org, name = repo_id.split("/")
    root = hf_home / "hub" / f"models--{org}--{name}"
    snapshot = root / "snapshots" / commit
    for f in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / under / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XLPEFT_CACHE", str(tmp_path / "xlpeft-cache"))
    return home


@pytest.fixture(scope="module")
def bert():
    return load_base(base_dir("tiny-bert"))


def adapterhub(case: str) -> Path:
    return FIXTURES / "adapterhub" / case


@torch.no_grad()
def logits(model, exp) -> torch.Tensor:
    return model(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"]).logits


@pytest.mark.parametrize("text, ref", [
    ("hf:AdapterHub/sw-adapter", HubRef("AdapterHub/sw-adapter")),
    ("hf:org/repo@v1.0", HubRef("org/repo", "v1.0")),
    ("hf:org/repo@" + C1 + ":adapters/sw", HubRef("org/repo", C1, "adapters/sw")),
    ("hf:org/repo:sw/", HubRef("org/repo", None, "sw")),
])
def test_parse_hub_ref(text, ref):
    assert parse_hub_ref(text) == ref
    assert parse_hub_ref(str(ref)) == ref


@pytest.mark.parametrize("text", ["hf:repo-without-org", "hf:org/repo:../up", "AdapterHub/x", "hf:org/re po", "hf:a/b@x@y"])
def test_bad_hub_refs_are_one_clear_error(text):
    with pytest.raises(XlpeftError, match=r"hf:ORG/REPO\[@REVISION\]\[:SUBDIR\]"):
        parse_hub_ref(text)


def test_adapterhub_repo_converts_once_and_gives_adapterhubs_logits(hf_home, tmp_path, bert, monkeypatch):
    cache_repo(hf_home, "AdapterHub/tiny-bert-sw-seq-bn", adapterhub("seq_bn"), C1)
    model = xlpeft.compose(bert, ["hf:AdapterHub/tiny-bert-sw-seq-bn"])
    exp = expected("adapterhub", "seq_bn")
    assert max_diff(model, exp) <= TOLERANCE
    direct = xlpeft.compose(bert, [convert(adapterhub("seq_bn"), tmp_path / "direct", "adapterhub", base=bert)])
    assert torch.equal(logits(model, exp), logits(direct, exp))
    leaf = model.xlpeft_composition.leaves()[0]
    assert leaf.source == f"hf:AdapterHub/tiny-bert-sw-seq-bn@{C1}", "the record names the commit it read"
    first = hub_module("hf:AdapterHub/tiny-bert-sw-seq-bn", bert)
    assert first.layout == "adapterhub" and first.commit == C1
    assert first.path.is_relative_to(tmp_path / "xlpeft-cache" / "hub")

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr("xlpeft.interop.convert", no_second_conversion)
    assert hub_module("hf:AdapterHub/tiny-bert-sw-seq-bn", bert).path == first.path
    assert hub_module("hf:AdapterHub/tiny-bert-sw-seq-bn", fingerprint=bert.fingerprint).path == first.path


def test_peft_lora_repo_gives_the_same_logits_as_converting_the_directory(hf_home, tmp_path, bert):
    from xlpeft.interop.peft import export_peft

    own = convert(adapterhub("lora"), tmp_path / "xl-lora", "adapterhub", base=bert)
    peft_dir = export_peft(own, tmp_path / "peft-lora")
    cache_repo(hf_home, "someone/tiny-bert-sw-lora", peft_dir, C1)
    model = xlpeft.compose(bert, ["hf:someone/tiny-bert-sw-lora"])
    hub = hub_module("hf:someone/tiny-bert-sw-lora", bert)
    assert hub.layout == "peft" and load_module(hub.path).manifest.method == "lora"
    direct = xlpeft.compose(bert, [convert(peft_dir, tmp_path / "direct", "peft", base=bert)])
    exp = expected("adapterhub", "lora")
    assert torch.equal(logits(model, exp), logits(direct, exp))
    assert max_diff(model, exp) <= TOLERANCE, "AdapterHub -> xlpeft -> peft -> hub -> xlpeft keeps the function"


def test_composable_sft_repo_gives_composable_sfts_logits(hf_home, bert):
    cache_repo(hf_home, "cambridgeltl/tiny-bert-lang-sft-sw", FIXTURES / "composable_sft" / "lang_bert_diffs", C1)
    model = xlpeft.compose(bert, ["hf:cambridgeltl/tiny-bert-lang-sft-sw"])
    assert max_diff(model, expected("composable_sft", "lang_bert_diffs")) <= TOLERANCE
    hub = hub_module("hf:cambridgeltl/tiny-bert-lang-sft-sw", bert)
    assert hub.layout == "composable-sft" and load_module(hub.path).manifest.lang == "tiny-bert-lang-sft-sw"


def test_xlpeft_repo_resolves_and_a_revision_pins_its_snapshot(hf_home, tmp_path, bert):
    one = convert(adapterhub("seq_bn"), tmp_path / "one", "adapterhub", base=bert)
    two = convert(adapterhub("double_seq_bn"), tmp_path / "two", "adapterhub", base=bert)
    old = cache_repo(hf_home, "me/sw-adapter", one, C1, refs=("v1",))
    cache_repo(hf_home, "me/sw-adapter", two, C2, refs=("main",))
    with pytest.raises(XlpeftError, match="outside the module"):
        load_module(old)  # why hub snapshots are copied: their files are symlinks into the blob store
    newest, tagged, pinned = (hub_module(f"hf:me/sw-adapter{rev}") for rev in ("", "@v1", f"@{C1}"))
    assert (newest.commit, tagged.commit, pinned.commit) == (C2, C1, C1)
    assert newest.layout == "xlpeft" and tagged.path == pinned.path != newest.path
    assert load_module(newest.path).manifest.config == load_module(two).manifest.config
    assert load_module(tagged.path).manifest.config == load_module(one).manifest.config
    assert not any(p.is_symlink() for p in tagged.path.rglob("*"))
    for ref, case in (("hf:me/sw-adapter@v1", "seq_bn"), ("hf:me/sw-adapter", "double_seq_bn")):
        assert max_diff(xlpeft.compose(bert, [ref]), expected("adapterhub", case)) <= TOLERANCE, ref


def test_subfolders(hf_home, tmp_path, bert):
    one = convert(adapterhub("seq_bn"), tmp_path / "one", "adapterhub", base=bert)
    cache_repo(hf_home, "me/bundle", one, C1, under="sw")
    assert load_module(hub_module("hf:me/bundle:sw").path).manifest.lang == "sw"
    with pytest.raises(XlpeftError, match=r"subfolders hold one, name it as :SUBDIR: sw"):
        hub_module("hf:me/bundle")
    with pytest.raises(XlpeftError, match="has no folder 'yo'"):
        hub_module("hf:me/bundle:yo")


def test_a_repo_the_cache_lacks_is_one_line_saying_how_to_fetch_it(hf_home, tmp_path, bert, capsys):
    cache_repo(hf_home, "me/sw-adapter", adapterhub("seq_bn"), C1)
    for ref in ("hf:nobody/missing", "hf:me/sw-adapter@v9"):
        with pytest.raises(XlpeftError) as info:
            hub_module(ref, bert)
        text = str(info.value)
        assert "\n" not in text and ref in text and "HF_HUB_OFFLINE is set" in text and "hf download" in text
    from xlpeft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "hf:nobody/missing", str(tmp_path / "out"), "--from", "peft", "--base", base_dir("tiny-bert")])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [line for line in err.splitlines() if
                                                                    line.startswith("Error: hf:nobody/missing")]


def test_foreign_layout_without_a_base_to_convert_against(hf_home):
    cache_repo(hf_home, "AdapterHub/tiny-bert-sw-seq-bn", adapterhub("seq_bn"), C1)
    # the config names "tiny-bert", which here is a fresh random base, not the one the caller composes on
    with pytest.raises(XlpeftError, match="fingerprint .* but the base here has fingerprint ffff"):
        hub_module("hf:AdapterHub/tiny-bert-sw-seq-bn", fingerprint="ffff")


def test_convert_reads_a_hub_source(hf_home, tmp_path):
    cache_repo(hf_home, "AdapterHub/tiny-bert-sw-seq-bn", adapterhub("seq_bn"), C1)
    runner = CliRunner()
    out = tmp_path / "sw"
    result = runner.invoke(cli, ["convert", "hf:AdapterHub/tiny-bert-sw-seq-bn", str(out), "--from", "adapterhub",
                                 "--base", base_dir("tiny-bert")])
    assert result.exit_code == 0, result.output
    assert load_module(out).manifest.method == "adapter"
    result = runner.invoke(cli, ["convert", "hf:AdapterHub/tiny-bert-sw-seq-bn", str(tmp_path / "x"), "--from", "peft",
                                 "--base", base_dir("tiny-bert")])
    assert isinstance(result.exception, XlpeftError) and "pass --from adapterhub" in str(result.exception)


def test_lang_module_setting_takes_a_hub_id(hf_home, bert):
    from xlpeft.lineage import baseline_language_module, language_module_for_task

    cache_repo(hf_home, "AdapterHub/tiny-bert-sw-seq-bn", adapterhub("seq_bn"), C1)
    cache_repo(hf_home, "AdapterHub/tiny-bert-ner", adapterhub("ner_seq_bn"), C2)
    module, lineage = language_module_for_task("hf:AdapterHub/tiny-bert-sw-seq-bn", "en", bert, "adapter")
    assert module.manifest.kind == "language"
    assert lineage["hub"] == f"hf:AdapterHub/tiny-bert-sw-seq-bn@{C1}" and lineage["layout"] == "adapterhub"
    assert lineage["path"] == lineage["hub"], "tags and messages name the pinned reference, not a cache folder"
    with pytest.raises(XlpeftError, match="language"):
        language_module_for_task("hf:AdapterHub/tiny-bert-ner", "en", bert, "adapter")
    # the zero-shot baseline finds the recorded parent again from its pinned commit
    task = load_module(hub_module("hf:AdapterHub/tiny-bert-ner", bert).path)
    task.manifest.extra["lang_module"] = lineage
    found = baseline_language_module(task, bert.fingerprint)
    assert found is not None and found.path == module.path
    task.manifest.extra["lang_module"] = {**lineage, "hub": "hf:nobody/gone@" + C1, "path": "hf:nobody/gone@" + C1}
    assert baseline_language_module(task, bert.fingerprint) is None, "a parent the cache lacks: no baseline"


def test_push_dry_run_lists_the_files_and_the_card_without_network(hf_home, tmp_path, bert, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a dry run touched the hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", no_network)
    module = convert(adapterhub("seq_bn"), tmp_path / "lang-sw-adapter", "adapterhub", base=bert)
    result = CliRunner().invoke(cli, ["push", str(module), "me/tiny-sw-adapter", "--dry-run", "--license", "mit"])
    assert result.exit_code == 0, result.output
    out = result.output
    files = {p.name: p.stat().st_size for p in module.iterdir()}
    assert {"xlpeft.json", "adapter.safetensors"} <= files.keys()
    for name in files:
        assert any(line.split()[:1] == [name] for line in out.splitlines()), f"{name} listed"
    assert "README.md" in out and "(generated model card)" in out and "--- README.md ---" in out
    card = out.split("--- README.md ---\n", 1)[1]
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "xlpeft" and meta["language"] == ["sw"] and meta["license"] == "mit"
    assert {"xlpeft", "language-module", "adapter"} <= set(meta["tags"])
    assert "pfeiffer-etal-2020-mad" in card and "--set lang_module=hf:me/tiny-sw-adapter" in card
    assert bert.fingerprint in card


def test_card_contents(tmp_path, bert):
    lora = load_module(convert(adapterhub("lora"), tmp_path / "lora", "adapterhub", base=bert))
    card = model_card(lora, "me/sw-lora")
    assert "hu2022lora" in card and "| method | lora |" in card and "| trainable parameters |" in card
    assert "base_model:" not in card and str(FIXTURES) not in card, "a local base: no hub id, and no local path"
    trained = dataclasses.replace(lora, manifest=dataclasses.replace(
        lora.manifest, training={"corpora": ["/home/me/private/sw.txt"], "steps": 5, "eval_loss": 1.5}))
    card = model_card(trained, "me/sw-lora")
    assert "/home/me" not in card and "sw.txt (a local file)" in card and "| loss | 1.5000 |" in card
    task = load_module(convert(adapterhub("ner_seq_bn"), tmp_path / "ner", "adapterhub", base=bert))
    card = model_card(task, "me/ner-adapter")
    assert '["LANG_MODULE_DIR_OR_NAME", "hf:me/ner-adapter"]' in card and "| kind | task |" in card
    assert hub_base_id("mbert") == "google-bert/bert-base-multilingual-cased"
    assert hub_base_id("/c/hub/models--FacebookAI--xlm-roberta-base/snapshots/abc") == "FacebookAI/xlm-roberta-base"
    assert hub_base_id(str(tmp_path)) is None


def test_every_shipped_method_cites_a_paper():
    from xlpeft.registry import get_method, method_names

    shipped = [n for n in method_names() if get_method(n).prepare.__module__.startswith("xlpeft.methods")]
    assert len(shipped) >= 2
    missing = [n for n in shipped if not citations(get_method(n).help)]
    assert not missing, f"add the BibTeX of the paper their help names to xlpeft.hub_card.CITATIONS: {missing}"


class FakeApi:
    calls: list = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch, exist_ok))

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=""):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, revision, files, (Path(folder_path) / "README.md").read_text()))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"

        return Info()


def test_push_uploads_the_module_and_card_and_needs_a_token(hf_home, tmp_path, bert, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    module = convert(adapterhub("seq_bn"), tmp_path / "lang-sw-adapter", "adapterhub", base=bert)
    args = ["push", str(module), "me/tiny-sw-adapter", "--revision", "dev", "--private"]
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, XlpeftError) and "HF_HUB_OFFLINE is set" in str(result.exception)
    monkeypatch.setattr("xlpeft.hub.offline", lambda: False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, XlpeftError) and "hf auth login" in str(result.exception)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "pushed: https://huggingface.co/me/tiny-sw-adapter/commit/abc" in result.output
    (_, _, private, exist_ok), branch, (_, repo, revision, files, card) = FakeApi.calls
    assert private is True and exist_ok is True and branch == ("create_branch", "me/tiny-sw-adapter", "dev", True)
    assert repo == "me/tiny-sw-adapter" and revision == "dev"
    assert files == sorted([*(p.name for p in module.iterdir()), "README.md"])
    assert "library_name: xlpeft" in card


def test_train_task_over_a_hub_language_module_records_its_commit(hf_home, tmp_path, monkeypatch, capsys):
    from tests.conftest import make_ner, use_store, write_conll
    from xlpeft.cli import main

    use_store(monkeypatch, tmp_path)
    cache_repo(hf_home, "AdapterHub/tiny-bert-sw-seq-bn", adapterhub("seq_bn"), C1)
    write_conll(tmp_path / "train.conll", make_ner(40, seed=1))
    write_conll(tmp_path / "eval.conll", make_ner(10, seed=2))
    out = tmp_path / "task-ner"
    main(["train-task", "--task", "ner", "--lang", "en", "--method", "adapter", "--base", base_dir("tiny-bert"),
          "--train-data", str(tmp_path / "train.conll"), "--eval-data", str(tmp_path / "eval.conll"),
          "--max-steps", "2", "--set", "max_seq_len=32", "--set", "lang_module=hf:AdapterHub/tiny-bert-sw-seq-bn",
          "--output", str(out)])
    assert f"over hf:AdapterHub/tiny-bert-sw-seq-bn@{C1}" in capsys.readouterr().out
    task = load_module(out)
    parent = task.manifest.extra["lang_module"]
    assert parent["hub"] == f"hf:AdapterHub/tiny-bert-sw-seq-bn@{C1}" and parent["method"] == "adapter"
    from xlpeft.lineage import baseline_stack

    stack = baseline_stack(task, task.manifest.base["fingerprint"])
    assert [m.manifest.kind for m in stack] == ["language", "task"], "the zero-shot baseline finds the hub parent"


def test_push_to_an_unreachable_hub_is_one_line(hf_home, tmp_path, bert, monkeypatch):
    import huggingface_hub

    from xlpeft.hub import transport_errors

    assert transport_errors(), "the HTTP client's error class is found"

    class Unreachable(FakeApi):
        def create_repo(self, *args, **kwargs):
            raise transport_errors()[0]("[Errno -2] Name or service not known")

    module = convert(adapterhub("seq_bn"), tmp_path / "lang-sw-adapter", "adapterhub", base=bert)
    monkeypatch.setattr("xlpeft.hub.offline", lambda: False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)
    result = CliRunner().invoke(cli, ["push", str(module), "me/tiny-sw-adapter"])
    assert isinstance(result.exception, XlpeftError)
    assert "could not push to me/tiny-sw-adapter" in str(result.exception) and "\n" not in str(result.exception)
