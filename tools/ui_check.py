"""`make ui-check`: the MLflow UI on a copy of the demo store, in headless Chromium, checked from the rendered DOM.

The API can hold descriptions, aliases and artifacts the UI never shows; only the rendered page proves a user
sees them. The user's ``mlflow.db`` and artifact folders are copied to a temporary directory (only read), an
``mlflow server`` on 127.0.0.1 serves the copy from its own process group, MlflowClient says what to expect,
and ``chromium --headless=new --dump-dom --screenshot`` opens the runs table, the evaluation run, its
heat-map, the registry, one model and one version. Each assertion prints PASS or FAIL; screenshots go to
``$XLPEFT_CACHE/ui-check/<timestamp>/`` (01-runs.png first). Exit 0: all passed, 1: one failed, 2: could not run.

MLflow 3.17's UI picks an experiment's first page from its GenAI / Model-training switch (the URL's
``?workflowType=`` or localStorage, default GenAI), not from the ``mlflow.experimentKind`` tag, so experiment
pages are opened with ``workflowType=machine_learning``, as after clicking "Model training" once.
"""

from __future__ import annotations

import argparse
import atexit
import html
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

APT_HINT = "apt-get install -y --no-install-recommends chromium fonts-dejavu-core"
ML_WORKFLOW = "workflowType=machine_learning"  # the sidebar's "Model training" switch, as a URL query
ARTIFACT_DIRS = ("mlruns", "mlartifacts")  # where a local store keeps artifacts, next to mlflow.db
HEATMAP = "evaluation/matrix.png"  # what `xlpeft evaluate` logs (xlpeft/matrix.py)
ALIAS = "production"  # what `xlpeft promote` sets; set on the copy when the store has no alias
URI_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("model_versions", "source"),
               ("model_versions", "storage_location"), ("logged_models", "artifact_location"))


class UiCheckError(Exception):
    """The check cannot run: one line saying what is missing and how to fix it."""


# ---- pure helpers: URLs and DOM text


def ui_url(base: str, route: str, ml: bool = False) -> str:
    """The UI's hash route ``route`` on ``base``; ``ml`` opens it in the Model-training workflow."""
    return f"{base.rstrip('/')}/#{urllib.parse.quote(route, safe='/')}" + (f"?{ML_WORKFLOW}" if ml else "")


def page_title(dom: str) -> str:
    """The ``<title>`` of a dumped DOM (the UI names its page there: "Runs - Experiment 1 - MLflow")."""
    found = re.search(r"<title[^>]*>(.*?)</title>", dom, flags=re.S | re.I)
    return " ".join(html.unescape(found.group(1)).split()) if found else ""


def page_text(dom: str) -> str:
    """The visible text of a dumped DOM: scripts and styles dropped, tags removed, whitespace collapsed."""
    dom = re.sub(r"<(script|style|svg)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def _plain(text: str) -> str:
    """``text`` without Markdown markup characters and with single spaces, so source and rendering compare."""
    return " ".join(re.sub(r"[*_`#>|\[\]]", " ", text).split())


def shows(dom: str, needle: str) -> bool:
    """Whether the page's visible text contains ``needle`` (Markdown markup and spacing ignored)."""
    return bool(needle.strip()) and _plain(needle) in _plain(page_text(dom))


def shows_image(dom: str, name: str) -> bool:
    """Whether an ``<img>`` whose alt names ``name`` was rendered with loaded content (a blob or data URL)."""
    tags = [(re.search(r'alt="([^"]*)"', t), re.search(r'src="([^"]*)"', t))
            for t in re.findall(r"<img\b[^>]*>", dom, flags=re.I)]
    return any(alt and src and html.unescape(alt.group(1)).endswith(name) and src.group(1).startswith(("blob:", "data:"))
               for alt, src in tags)


def description_snippet(description: str, limit: int = 120) -> str:
    """The first non-empty line of a Markdown description, cut at a word under ``limit`` characters."""
    line = next((ln.strip(" -") for ln in description.splitlines() if ln.strip(" -")), "")
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0]


# ---- the store copy


def copy_store(store: Path, dest: Path) -> tuple[Path, list[str]]:
    """Copy ``store``'s mlflow.db and artifact folders into ``dest``, the copy pointing at its own artifacts.

    Returns (the copied database, the artifact folders copied); raises UiCheckError if there is no mlflow.db.
    """
    db = store / "mlflow.db"
    if not db.is_file():
        raise UiCheckError(f"no demo store: expected {db}, found none; run `make demo` first (or pass --store DIR)")
    dest.mkdir(parents=True, exist_ok=True)
    src, out, copied = sqlite3.connect(f"file:{db}?mode=ro", uri=True), sqlite3.connect(dest / "mlflow.db"), []
    try:
        src.backup(out)  # a consistent snapshot even while something writes
        for name in ARTIFACT_DIRS:
            if (store / name).is_dir():
                shutil.copytree(store / name, dest / name, symlinks=True)
                copied.append(name)
                for old in {f"{(store / name).absolute()}/", f"{(store / name).resolve()}/"}:  # as MLflow wrote it
                    _rewrite_prefix(out, old, f"{(dest / name).resolve()}/")
        out.commit()
    except sqlite3.DatabaseError as exc:
        raise UiCheckError(f"{db} is not a readable SQLite store ({exc}); pass --store the folder `make demo` "
                           "wrote mlflow.db into") from None
    finally:
        src.close()
        out.close()
    return dest / "mlflow.db", copied


def _rewrite_prefix(conn: sqlite3.Connection, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in every artifact-URI column the schema has (file:// URIs and plain paths)."""
    for table, column in URI_COLUMNS:
        if column in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (old, new))


# ---- processes: the server and the browser, each in its own process group


_LIVE: set[subprocess.Popen] = set()  # process groups to stop, also on Ctrl-C and at exit


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM ``proc``'s process group (it leads one), SIGKILL it after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    _LIVE.discard(proc)


def _stop_all() -> None:
    for proc in list(_LIVE):
        _stop(proc)


def free_port(port: int = 0) -> int:
    """``port`` if free on 127.0.0.1 (any free port for 0)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise UiCheckError(f"port {port} on 127.0.0.1 is in use ({exc.strerror}); pass another --port "
                               "or 0 for any free one") from None
        return s.getsockname()[1]


def start_server(db: Path, port: int, log: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on the copy at 127.0.0.1:``port``, waited for until /health answers; (process, URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: starts in half the time
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if (db.parent / "mlartifacts").is_dir():  # mlflow-artifacts:/ URIs of a store once written through a server
        cmd += ["--artifacts-destination", str(db.parent / "mlartifacts")]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=db.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _LIVE.add(proc)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UiCheckError(f"mlflow server exited with status {proc.returncode}; last lines of {log}: "
                               f"{log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise UiCheckError(f"mlflow server gave no /health answer within {timeout:.0f} s; last lines of {log}: "
                       f"{log_tail(log)}")


def log_tail(log: Path, lines: int = 8) -> str:
    """The last ``lines`` lines of ``log``, joined with " | " so an error stays one line."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:]) or "(empty log)"


def find_chromium(given: str | None) -> str:
    """The Chromium executable: ``given``, ``$CHROMIUM`` or ``chromium`` on PATH."""
    name = given or os.environ.get("CHROMIUM") or "chromium"
    found = shutil.which(name)
    if not found:
        raise UiCheckError(f"no Chromium: expected {name!r} on PATH, found none; install it as root with "
                           f"`apt-get update && {APT_HINT}` (or pass --chromium PATH)")
    return found


def render(chromium: str, url: str, shot: Path, profile: Path, timeout: float = 180.0) -> str:
    """Load ``url`` in headless Chromium, save a 1400x900 screenshot to ``shot``; the rendered DOM."""
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--window-size=1400,900",
           f"--screenshot={shot}", "--dump-dom", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    _LIVE.add(proc)
    try:
        dom, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UiCheckError(f"chromium did not finish {url} within {timeout:.0f} s") from None
    finally:
        _stop(proc, grace=2.0)  # its renderer and GPU helpers too
    return dom.decode("utf-8", errors="replace")


# ---- what the UI should show, read through the API


@dataclass(frozen=True)
class Expected:
    """What the store holds, so the pages can be checked against it."""

    experiment_id: str
    experiment_kind: str  # the mlflow.experimentKind tag ("" if unset)
    run_names: tuple[str, ...]  # the newest runs, newest first (the ones the first table page shows)
    eval_run: tuple[str, str] | None  # (run id, run name) of the newest run that logged the heat-map
    models: tuple[tuple[str, str], ...]  # (registered xlpeft-* name, its newest version)
    model: str = ""  # the name whose model and version pages are opened ("" if none)
    version: str = ""
    description: str = ""
    alias: str = ""


def expectations(c, experiment: str, runs_shown: int = 10) -> Expected:
    """Read ``experiment``'s runs, the heat-map run and the xlpeft-* registry through MlflowClient ``c``."""
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise UiCheckError(f"the store has no experiment {experiment!r}; run `make demo` (or set $XLPEFT_EXPERIMENT)")
    eid, newest = exp.experiment_id, ["attributes.start_time DESC"]
    runs = c.search_runs([eid], order_by=newest, max_results=runs_shown)
    evaluations = c.search_runs([eid], "attributes.run_name LIKE 'evaluate-%'", order_by=newest, max_results=20)
    eval_run = next(((r.info.run_id, r.info.run_name) for r in evaluations
                     if any(a.path == HEATMAP for a in c.list_artifacts(r.info.run_id, "evaluation"))), None)
    latest = {m.name: str(max((int(v.version) for v in c.search_model_versions(f"name='{m.name}'")), default=0))
              for m in c.search_registered_models("name LIKE 'xlpeft-%'", max_results=100)}
    found = Expected(eid, (exp.tags or {}).get("mlflow.experimentKind", ""), tuple(r.info.run_name for r in runs),
                     eval_run, tuple(sorted(latest.items())))
    if not latest:
        return found
    # Open the pages of an aliased name if there is one, else of a composition (xlpeft-<task>-<lang>), else any.
    aliases = {name: dict(c.get_registered_model(name).aliases or {}) for name in latest}
    model = max(latest, key=lambda n: (bool(aliases[n]), n.count("-") == 2, n))
    alias, version = next(iter(sorted(aliases[model].items())), ("", latest[model]))
    description = c.get_model_version(model, str(version)).description or ""
    return replace(found, model=model, version=str(version), description=description, alias=alias)


def ensure_alias(c, found: Expected) -> tuple[Expected, str]:
    """``found`` with an alias: if its model has none, set ``production`` on its version (in the copy only)."""
    if found.alias or not found.model:
        return found, ""
    c.set_registered_model_alias(found.model, ALIAS, found.version)
    note = (f"NOTE  the store has no alias on {found.model}; set {ALIAS} -> version {found.version} on the copy "
            "(as `xlpeft promote` would), so the alias check has something to find")
    return replace(found, alias=ALIAS), note


# ---- pages and their assertions


@dataclass(frozen=True)
class Page:
    """One screenshot: a file stem, a hash route, the checks its DOM must pass (label -> predicate)."""

    stem: str
    route: str
    ml: bool
    checks: tuple[tuple[str, object], ...]


def pages(found: Expected) -> list[Page]:
    """The pages to open, the runs table first, each with what it must show."""
    exp = f"/experiments/{found.experiment_id}"
    plan = [Page("01-runs", exp, True, (
        ("runs page opens first (title 'Runs', not the GenAI Overview)", lambda dom: page_title(dom).startswith("Runs")),
        *((f"runs table shows run {name!r}", lambda dom, n=name: shows(dom, n)) for name in found.run_names)))]
    if found.eval_run:
        run_id, name = found.eval_run
        plan.append(Page("02-run", f"{exp}/runs/{run_id}", True, (
            (f"run page shows {name!r}", lambda dom: shows(dom, name) and page_title(dom).startswith("Run ")),)))
        plan.append(Page("03-heatmap", f"{exp}/runs/{run_id}/artifactPath/{HEATMAP}", True, (
            (f"artifacts list {HEATMAP}", lambda dom: shows(dom, HEATMAP)),
            ("heat-map image is rendered", lambda dom: shows_image(dom, HEATMAP.rsplit("/", 1)[-1])))))
    plan.append(Page("04-registry", "/models", False, (
        ("registry lists xlpeft-* names", lambda dom: bool(found.models) and shows(dom, "xlpeft-")),
        *((f"registry shows {m!r} with its version {v}", lambda dom, m=m, v=v: shows(dom, f"{m} Version {v}"))
          for m, v in found.models))))
    if found.model:
        snippet = description_snippet(found.description)
        plan.append(Page("05-model", f"/models/{found.model}", False, (
            (f"model page lists version {found.version}", lambda dom: shows(dom, f"Version {found.version}")),
            (f"model page shows alias @{found.alias}", lambda dom: shows(dom, f"@ {found.alias}")))))
        plan.append(Page("06-version", f"/models/{found.model}/versions/{found.version}", False, (
            (f"version page shows its description {snippet[:60]!r}", lambda dom: shows(dom, snippet)),
            (f"version page shows alias @{found.alias}", lambda dom: shows(dom, f"@ {found.alias}")))))
    return plan


def store_checks(found: Expected) -> list[tuple[str, bool]]:
    """What must be in the store before any page can show it."""
    return [("store: experiment tagged mlflow.experimentKind=custom_model_development (runs, not GenAI)",
             found.experiment_kind == "custom_model_development"),
            ("store: an evaluate-* run logged the heat-map " + HEATMAP, found.eval_run is not None),
            ("store: xlpeft-* registered models exist", bool(found.models)),
            (f"store: {found.model or 'the opened model'} v{found.version or '?'} has a description",
             bool(found.description.strip()))]


# ---- the check


def run_check(store: Path, out: Path, chromium: str, port: int = 0, experiment: str = "xlpeft") -> int:
    """Copy ``store``, serve it, open and check every page; 0 if every assertion passed, else 1."""
    from mlflow import MlflowClient

    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="xlpeft-ui-check-"))
    try:
        db, copied = copy_store(store, work / "store")
        print(f"copied {store / 'mlflow.db'} (+ {', '.join(copied) or 'no artifact folder'}) to {work / 'store'}")
        port = free_port(port)
        _server, url = start_server(db, port, work / "server.log")
        print(f"mlflow server on the copy: {url} (log {work / 'server.log'})")
        c = MlflowClient(url)
        found, note = ensure_alias(c, expectations(c, experiment))
        if note:
            print(note)
        results = list(store_checks(found))
        out.mkdir(parents=True, exist_ok=True)
        shots = []
        for page in pages(found):
            shot = out / f"{page.stem}.png"
            dom = render(chromium, ui_url(url, page.route, page.ml), shot, work / "profile")
            (out / f"{page.stem}.html").write_text(dom, encoding="utf-8")
            shots.append(shot)
            results += [(f"{page.stem}: {label}", bool(test(dom))) for label, test in page.checks]
        bare = render(chromium, ui_url(url, f"/experiments/{found.experiment_id}"), work / "bare.png", work / "fresh")
        print(f"INFO  the bare URL /#/experiments/{found.experiment_id} opens {page_title(bare)!r} in a fresh profile "
              "(MLflow 3.17 follows the GenAI / Model-training switch there, not the experiment tag)")
    finally:
        _stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(f"{'PASS' if passed else 'FAIL'}  {label}" for label, passed in results))
    failed = sum(not passed for _, passed in results)
    print("screenshots:\n" + "\n".join(f"  {s}" for s in shots if s.is_file()))
    print(f"{len(results) - failed} passed, {failed} failed in {time.monotonic() - start:.0f} s")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the check; errors that stop it print one ``Error:`` line and return 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path.cwd(), help="folder holding mlflow.db (default: here)")
    parser.add_argument("--out", type=Path, help="screenshot folder (default $XLPEFT_CACHE/ui-check/<timestamp>)")
    parser.add_argument("--port", type=int, default=0, help="server port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--chromium", help="Chromium executable (default $CHROMIUM or chromium on PATH)")
    args = parser.parse_args(argv)
    cache = os.environ.get("XLPEFT_CACHE") or Path.home() / ".cache" / "xlpeft"  # xlpeft.models.cache_dir, no torch
    out = args.out or Path(cache) / "ui-check" / time.strftime("%Y%m%d-%H%M%S")
    atexit.register(_stop_all)
    # Ctrl-C and SIGTERM raise KeyboardInterrupt, which unwinds through the finally that stops the groups.
    previous = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run_check(args.store.resolve(), out.resolve(), find_chromium(args.chromium), args.port,
                         os.environ.get("XLPEFT_EXPERIMENT", "xlpeft"))
    except UiCheckError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Error: interrupted; the server and browser were stopped", file=sys.stderr)
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
