"""Issue 15, masked internal errors: each bad input gets one clear `Error:` line before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.hostile.conftest import lang_args, run_cli, task_args


@pytest.mark.parametrize("pair, needle", [
    ("lr=nan", "lr"), ("eval_fraction=nan", "eval_fraction"), ("mlm_probability=nan", "mlm_probability"),
    ("warmup_ratio=nan", "warmup_ratio"), ("reduction_factor=nan", "reduction_factor"),
    (f"seed={2**70}", "seed"), ("seed=-1", "seed"), ("device=banana", "device"),
    ("eval_every=1.5", "an int"), ("lang_module=", "lang_module"),
])
def test_bad_set_values(capsys, store, tiny, corpus, ner, pair, needle):
    args = task_args(tiny, ner) if pair.startswith("lang_module") else lang_args(tiny, corpus)
    store.refused(store.run(capsys, *args, "--set", pair), needle)


def test_cuda_on_a_cpu_build(capsys, store, tiny, corpus):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    store.refused(store.run(capsys, *lang_args(tiny, corpus, "--set", "device=cuda")), "cuda")


def test_predict_invalid_utf8_stdin(capsys, store, tiny, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Juma \xff\xfe alikwenda\n"), encoding="utf-8"))
    store.refused(store.run(capsys, "predict", "--lang", "sw", "--task", "ner", "--base", tiny), "UTF-8")


@pytest.mark.parametrize("content, needle", [
    ("[1, 2, 3]", "object"),
    (None, "base"),
    ("[" * 200_000 + "]" * 200_000, "nested"),
    ('{"format_version": 1, "kind": "language", "method": "adapter", "base": {"fingerprint": 5}, "config": {}}', "base"),
])
def test_malformed_manifests(capsys, store, tiny, ner, content, needle):
    bad = store.root / "badmod"
    bad.mkdir()
    if content is None:
        content = json.dumps({"format_version": 1, "kind": "language", "method": "adapter", "base": "tiny-bert",
                              "config": {}})
    (bad / "xlpeft.json").write_text(content, encoding="utf-8")
    outcome = store.run(capsys, *task_args(tiny, ner)[:-4], "--set", f"lang_module={bad}")
    store.refused(outcome, needle)


def test_manifest_of_a_task_module_is_not_a_language_module(capsys, store, tiny, ner):
    task_dir = store.root / "t"
    assert store.run(capsys, *task_args(tiny, ner, "--output", task_dir)).code == 0
    outcome = store.run(capsys, *task_args(tiny, ner)[:-4], "--set", f"lang_module={task_dir}")
    store.refused(outcome, "task module", "language module")


@pytest.mark.parametrize("uri", ["foo://bar", "relative/plain/path"])
def test_bad_tracking_uri(capsys, store, tiny, corpus, monkeypatch, uri):
    good = os.environ["MLFLOW_TRACKING_URI"]
    store.mark()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    outcome = run_cli(capsys, *lang_args(tiny, corpus))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", good)
    store.refused(outcome, "MLFLOW_TRACKING_URI")
    assert not Path(uri).exists()


def test_quote_in_lang_with_resume(capsys, store, tiny, ner):
    outcome = store.run(capsys, *task_args(tiny, ner, "--lang", "e'n", "--resume"))
    store.refused(outcome, "e'n")


def test_find_resumable_quotes_filter_values(workdir):
    from xlpeft.tracking.lifecycle import find_resumable

    tags = {"xlpeft.kind": "task", "xlpeft.lang": "e'n", "xlpeft.task": "ner"}
    from xlpeft import tracking

    with tracking.tracked_run("r", tags, {}):
        pass
    assert find_resumable(tags, {}) is None  # a FINISHED run; the filter parsed


def test_task_as_absolute_path(capsys, store, tiny, ner):
    pack = Path(__file__).resolve().parents[2] / "task_packs" / "ner"
    outcome = store.run(capsys, "train-task", "--task", str(pack), "--base", tiny, "--train-data", ner["train"],
                        "--max-steps", "2", "--set", "lang_module=none")
    store.refused(outcome, "--task")


def test_registered_version_without_artifacts(capsys, store, tiny, corpus, ner):
    import shutil

    from xlpeft import tracking

    assert store.run(capsys, *lang_args(tiny, corpus)).code == 0
    version = tracking.list_versions("xlpeft-lang-sw-adapter")[0]
    artifact_dir = Path(tracking.client().get_run(version.run_id).info.artifact_uri.removeprefix("file://"))
    shutil.rmtree(artifact_dir / "module")
    shutil.rmtree(Path(os.environ["XLPEFT_CACHE"]) / "registry", ignore_errors=True)
    outcome = store.run(capsys, *task_args(tiny, ner)[:-4], "--lang", "sw", "--set", "lang_module=auto")
    store.refused(outcome, "xlpeft-lang-sw-adapter", "artifacts")


def test_truncated_cached_base(capsys, store, tiny, corpus):
    import shutil

    broken = store.root / "cache" / "bases" / "broken"
    shutil.copytree(tiny, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    store.refused(store.run(capsys, *lang_args(str(broken), corpus)), "broken")


def test_read_only_cache_in_compose(capsys, store, tiny, corpus, ner, monkeypatch):
    assert store.run(capsys, *lang_args(tiny, corpus)).code == 0
    assert store.run(capsys, *task_args(tiny, ner)).code == 0
    ro = store.root / "ro-cache"
    ro.mkdir()
    ro.chmod(0o555)
    # root may write anywhere: then a cache below a regular file stands in for a read-only one
    monkeypatch.setenv("XLPEFT_CACHE", str(ro if not os.access(ro, os.W_OK) else store.root / "notes.txt" / "cache"))
    try:
        outcome = store.run(capsys, "compose", "--lang", "sw", "--task", "ner", "--base", tiny,
                            "--eval-data", ner["eval"])
        store.refused(outcome, "XLPEFT_CACHE")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("where", ["checkpoint", "module"])
def test_full_disk(capsys, store, tiny, corpus, monkeypatch, where):
    import errno

    import xlpeft.checkpoint as ckpt
    import xlpeft.io as io

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt if where == "checkpoint" else io, "save_file", no_space)
    out = store.root / "modules" / "full"
    outcome = store.run(capsys, *lang_args(tiny, corpus, "--output", out, "--max-steps", "4", "--set",
                                           "checkpoint_every=2"))
    store.refused(outcome, "space", runs="failed")
    assert not out.exists()
    leftovers = [p for p in (store.root / "modules").rglob("*")] if (store.root / "modules").exists() else []
    if where == "checkpoint":
        assert not any(p.name.startswith(".checkpoint.safetensors") for p in leftovers), leftovers
        assert not [p for p in leftovers if p.parent.name == ".checkpoints" and not any(p.iterdir())], leftovers
    else:
        assert not any(".tmp-" in p.name for p in leftovers), leftovers


def test_replay_on_a_spool_whose_store_is_gone(capsys, workdir, monkeypatch):
    from xlpeft.tracking import spool_path
    from xlpeft.tracking.__main__ import _main

    gone = workdir / "gone" / "mlflow.db"
    path = spool_path("abc123")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"op": "run", "run_id": "abc123", "uri": f"sqlite:///{gone}"}) + "\n"
                    + json.dumps({"op": "metrics", "metrics": {"loss": 1.0}, "step": 1, "ts": 1}) + "\n", encoding="utf-8")
    code = _main(["replay", "abc123"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("Error:") == 1 and "Traceback" not in err, err
    assert "abc123" in err and path.is_file()
    assert not gone.exists(), "replaying must not create a fresh empty store"
