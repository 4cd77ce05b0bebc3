"""tools/ui_check.py (`make ui-check`): its DOM matching, URLs and store copy without a browser, and the whole
check in headless Chromium on a small store this test writes (slow; skipped where chromium is not installed).

The store is written with MlflowClient in the shapes xlpeft writes (experiment ``xlpeft`` tagged
``mlflow.experimentKind``, ``train-lang-*`` and ``evaluate-*`` runs, ``evaluation/matrix.png``, an
``xlpeft-lang-*`` name whose version has a Markdown description), not by training: the check reads a store,
so what matters is what the store holds, and writing one takes seconds.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import sqlite3
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ui_check", ROOT / "tools" / "ui_check.py")
ui = importlib.util.module_from_spec(_spec)
sys.modules["ui_check"] = ui  # dataclasses look their module up by name
_spec.loader.exec_module(ui)

NAME = "xlpeft-lang-sw-adapter"
DESCRIPTION = ("language module sw · adapter · base tiny · 40 steps · eval_loss=5.1234\n\n"
               "- trained on: bible:sw\n- steps: 40, seed 0\n")
needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason=f"no chromium on PATH (install: {ui.APT_HINT})")


def make_store(root: Path, *, registered: bool = True, kind: str | None = "custom_model_development") -> Path:
    """A small xlpeft-shaped store in ``root``: two runs, the heat-map, optionally one registered version."""
    from mlflow import MlflowClient
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    tags = {"mlflow.experimentKind": kind} if kind else {}
    eid = c.create_experiment("xlpeft", artifact_location=str(root / "mlruns" / "1"), tags=tags)
    module, evaluation = root / "module", root / "evaluation"
    module.mkdir()
    (module / "xlpeft.json").write_text("{}", encoding="utf-8")
    evaluation.mkdir()
    Image.new("RGB", (40, 30), (180, 40, 40)).save(evaluation / "matrix.png")
    train = c.create_run(eid, run_name="train-lang-sw-adapter").info.run_id
    c.log_artifacts(train, str(module), "module")
    c.set_terminated(train)
    evaluate = c.create_run(eid, run_name="evaluate-pos").info.run_id
    c.log_artifacts(evaluate, str(evaluation), "evaluation")
    c.set_terminated(evaluate)
    if registered:
        c.create_registered_model(NAME, description="xlpeft module")
        c.create_model_version(NAME, source=f"{c.get_run(train).info.artifact_uri}/module", run_id=train,
                               description=DESCRIPTION)
    shutil.rmtree(module)
    shutil.rmtree(evaluation)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("ui-store") / "store")


# ---- pure helpers


def test_ui_url_builds_hash_routes_and_the_model_training_switch():
    assert ui.ui_url("http://h:1/", "/models/xlpeft-ner-sw") == "http://h:1/#/models/xlpeft-ner-sw"
    assert ui.ui_url("http://h:1", "/experiments/3", ml=True) == "http://h:1/#/experiments/3?workflowType=machine_learning"
    assert ui.ui_url("http://h:1", "/models/a b") == "http://h:1/#/models/a%20b"


def test_page_text_drops_scripts_styles_and_tags():
    dom = ("<html><head><title>Runs - Experiment 1 - MLflow</title><style>.x{}</style></head>"
           "<body><script>var hidden = 1;</script><div>evaluate-pos</div><span>a &amp; b</span></body></html>")
    assert ui.page_title(dom) == "Runs - Experiment 1 - MLflow"
    assert ui.page_text(dom) == "Runs - Experiment 1 - MLflow evaluate-pos a & b"
    assert ui.page_title("<html><body>no title</body></html>") == ""


def test_shows_matches_text_across_tags_and_markdown():
    dom = "<p>language module <b>sw</b> ·\n adapter</p><li>eval<em>loss</em></li><script>secret</script>"
    assert ui.shows(dom, "language module sw · adapter")
    assert ui.shows(dom, "**language** module  sw")  # Markdown markup and spacing in the source are ignored
    assert not ui.shows(dom, "secret")  # script text is not visible
    assert not ui.shows(dom, "module tr")
    assert not ui.shows(dom, "  ")  # an empty needle proves nothing


def test_shows_image_needs_the_artifact_loaded():
    loaded = '<img alt="evaluation/matrix.png" src="blob:http://127.0.0.1:5000/1f2e" class="x">'
    assert ui.shows_image(loaded, "matrix.png")
    assert not ui.shows_image('<img alt="evaluation/matrix.png" src="">', "matrix.png")  # not fetched
    assert not ui.shows_image('<img alt="evaluation/other.png" src="blob:x">', "matrix.png")
    assert not ui.shows_image("<p>matrix.png</p>", "matrix.png")


def test_description_snippet_is_the_first_line_cut_at_a_word():
    assert ui.description_snippet("\n\n" + DESCRIPTION) == DESCRIPTION.splitlines()[0]
    assert ui.description_snippet("- only a bullet") == "only a bullet"
    assert ui.description_snippet("word " * 40, limit=22) == "word word word word"
    assert ui.description_snippet("") == ""


def expected(**changes) -> ui.Expected:
    base = ui.Expected("1", "custom_model_development", ("evaluate-pos", "train-lang-sw-adapter"),
                       ("r1", "evaluate-pos"), ((NAME, "2"),), NAME, "2", DESCRIPTION, "production")
    return replace(base, **changes)


def test_pages_open_the_runs_table_first_and_check_what_the_store_holds():
    plan = ui.pages(expected())
    assert [p.stem for p in plan] == ["01-runs", "02-run", "03-heatmap", "04-registry", "05-model", "06-version"]
    assert plan[0].ml and plan[0].route == "/experiments/1"
    runs_ok = "<title>Runs - Experiment 1 - MLflow</title><div>evaluate-pos</div><div>train-lang-sw-adapter</div>"
    genai = "<title>Overview - Experiment 1 - MLflow</title><div>evaluate-pos</div><div>train-lang-sw-adapter</div>"
    assert all(test(runs_ok) for _, test in plan[0].checks)
    assert [label for label, test in plan[0].checks if not test(genai)] == [plan[0].checks[0][0]]
    registry = f"<td>{NAME}</td><td>Version 2</td>"
    assert all(test(registry) for _, test in plan[3].checks)
    assert not all(test(f"<td>{NAME}</td><td>Version 1</td>") for _, test in plan[3].checks)
    version_page = f"<p>{DESCRIPTION.splitlines()[0]}</p><span>@</span><span>production</span>"
    assert all(test(version_page) for _, test in plan[5].checks)
    assert not plan[5].checks[0][1]("<p>language module sw</p>")


def test_pages_and_store_checks_without_models_or_heatmap():
    bare = expected(eval_run=None, models=(), model="", version="", description="", alias="", experiment_kind="")
    plan = ui.pages(bare)
    assert [p.stem for p in plan] == ["01-runs", "04-registry"]
    assert not plan[1].checks[0][1](f"<td>{NAME}</td>")  # nothing registered: the registry check fails
    assert [passed for _, passed in ui.store_checks(bare)] == [False, False, False, False]
    assert all(passed for _, passed in ui.store_checks(expected()))


# ---- the store copy and the errors that stop the check


def test_copy_store_points_the_copy_at_its_own_artifacts(store, tmp_path):
    before = (store / "mlflow.db").read_bytes()
    db, copied = ui.copy_store(store, tmp_path / "copy")
    assert copied == ["mlruns"]
    conn = sqlite3.connect(db)
    uris = [row[0] for row in conn.execute("SELECT artifact_uri FROM runs")]
    uris += [row[0] for row in conn.execute("SELECT source FROM model_versions")]
    uris += [row[0] for row in conn.execute("SELECT artifact_location FROM experiments WHERE name = 'xlpeft'")]
    conn.close()
    assert len(uris) == 4 and all(str(tmp_path / "copy" / "mlruns") in u for u in uris), uris
    assert all(str(store) not in u for u in uris)
    assert list((tmp_path / "copy" / "mlruns").rglob("matrix.png"))
    assert (store / "mlflow.db").read_bytes() == before  # the user's store is only read


def test_errors_are_one_line_with_the_fix(tmp_path, capsys):
    assert ui.main(["--store", str(tmp_path), "--chromium", sys.executable, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: no demo store") and "make demo" in err and err.count("\n") == 1
    assert ui.main(["--store", str(tmp_path), "--chromium", str(tmp_path / "no-chromium")]) == 2
    assert "apt-get install -y --no-install-recommends chromium" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "mlflow.db").write_text("not a database", encoding="utf-8")
    assert ui.main(["--store", str(tmp_path / "junk"), "--chromium", sys.executable, "--out", str(tmp_path / "o")]) == 2
    assert "is not a readable SQLite store" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ui.UiCheckError, match="in use"):
            ui.free_port(busy.getsockname()[1])
    log = tmp_path / "server.log"
    log.write_text("starting\n" + "".join(f"line {i}\n" for i in range(20)) + "Error: boom\n")
    assert ui.log_tail(log, 2) == "line 19 | Error: boom"
    assert ui.log_tail(tmp_path / "absent.log") == "(empty log)"


# ---- the whole check in Chromium


@pytest.mark.slow
@needs_chromium
def test_ui_check_passes_on_a_small_store(store, tmp_path, capsys):
    out = tmp_path / "shots"
    status = ui.main(["--store", str(store), "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "FAIL" not in text and text.count("PASS") >= 14
    assert "set production -> version 1 on the copy" in text  # the store had no alias: promoted on the copy
    assert "PASS  06-version: version page shows its description" in text
    shots = sorted(out.glob("*.png"))
    assert [s.stem for s in shots] == ["01-runs", "02-run", "03-heatmap", "04-registry", "05-model", "06-version"]
    assert all(s.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and s.stat().st_size > 10_000 for s in shots)
    assert "Runs - Experiment" in (out / "01-runs.html").read_text(encoding="utf-8")
    assert not ui._LIVE  # server and browsers stopped
    with sqlite3.connect(store / "mlflow.db") as conn:  # the alias went to the copy, not the user's store
        assert conn.execute("SELECT COUNT(*) FROM registered_model_aliases").fetchone()[0] == 0


@pytest.mark.slow
@needs_chromium
def test_ui_check_fails_when_the_registry_is_empty(tmp_path, capsys):
    store = make_store(tmp_path / "store", registered=False, kind=None)
    status = ui.main(["--store", str(store), "--out", str(tmp_path / "shots")])
    text = capsys.readouterr().out
    assert status == 1, text
    assert "FAIL  store: xlpeft-* registered models exist" in text
    assert "FAIL  04-registry: registry lists xlpeft-* names" in text
    assert "FAIL  store: experiment tagged mlflow.experimentKind" in text
    assert "PASS  03-heatmap: heat-map image is rendered" in text  # the rest is still checked
    assert not (tmp_path / "shots" / "05-model.png").exists()
