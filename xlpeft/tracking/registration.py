"""What a run's spooled calls do in the store: register a version (with its description and the name's tags),
log dataset inputs, log a table; and the descriptions and dataset records recipes hand them.

Every function here is safe to repeat, because :class:`~xlpeft.tracking.run.Tracker` replays a spooled
call after an outage whether or not the first attempt reached the store: a version is looked up by
its source before one is created, tags and descriptions are set (not appended), MLflow de-duplicates
dataset inputs by (name, digest) per run, and a table file is overwritten.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from xlpeft.data.registry_packages import sha256_file
from xlpeft.errors import XlpeftError

CONTEXT_TAG = "mlflow.data.context"  # what the UI shows next to a run's dataset: train / eval
LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # the run tag listing tables, so the run page renders them
MODEL_TAG_KEYS = {  # registered-model tags per kind: what a name stands for, whatever its versions differ in
    "language": ("xlpeft.kind", "xlpeft.lang", "xlpeft.lang_name", "xlpeft.method", "xlpeft.base"),
    "task": ("xlpeft.kind", "xlpeft.task", "xlpeft.method", "xlpeft.base"),
    "composition": ("xlpeft.kind", "xlpeft.task", "xlpeft.lang", "xlpeft.lang_name", "xlpeft.method", "xlpeft.base"),
}


def model_tags(tags: dict[str, str]) -> dict[str, str]:
    """The registered-model tags for a version's ``tags``: kind, language or task, method, base."""
    keys = MODEL_TAG_KEYS.get(tags.get("xlpeft.kind", ""), ("xlpeft.kind", "xlpeft.method", "xlpeft.base"))
    return {k: str(tags[k]) for k in keys if tags.get(k) not in (None, "", "none")}


# ---- registering a version


def register_version(c: Any, run_id: str, name: str, artifact_path: str, tags: dict[str, str],
                     local_dir: str | None, description: str = "") -> str:
    """Create a version of ``name`` for ``run_id``'s ``artifact_path`` (once), describe it, tag the name; its number."""
    from mlflow.exceptions import MlflowException

    run = c.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    check_uploaded(c, run_id, artifact_path, local_dir)
    # A retry after a lost answer must not register the same files twice.
    for v in c.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if v.source == source:
            if description and (v.description or "") != description:
                c.update_model_version(name, str(v.version), description=description)
            _tag_model(c, name, tags)
            return str(v.version)
    created = False
    try:
        c.create_registered_model(name, tags=model_tags(tags),
                                  description="xlpeft module (see xlpeft.json in the artifacts)")
        created = True
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    try:
        version = c.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                         description=description or None)
    except BaseException:  # Ctrl-C included
        if created:  # leave no empty registered name behind (best effort: the store may be gone)
            try:
                if not c.search_model_versions(f"name='{name}'"):
                    c.delete_registered_model(name)
            except Exception:
                pass
        raise
    if not created:
        _tag_model(c, name, tags)
    return str(version.version)


def _tag_model(c: Any, name: str, tags: dict[str, str]) -> None:
    """Set the name's tags to this version's values (the newest registration wins: its base, its language name)."""
    held = dict(c.get_registered_model(name).tags or {})
    for key, value in model_tags(tags).items():
        if held.get(key) != value:
            c.set_registered_model_tag(name, key, value)


def check_uploaded(c: Any, run_id: str, artifact_path: str, local_dir: str | None) -> None:
    """Every file of ``local_dir`` is in the run's ``artifact_path`` with the same size."""
    remote: dict[str, int | None] = {}
    todo = [artifact_path]
    while todo:
        for info in c.list_artifacts(run_id, todo.pop()):
            if info.is_dir:
                todo.append(info.path)
            else:
                remote[info.path[len(artifact_path):].lstrip("/")] = info.file_size
    if local_dir and Path(local_dir).is_dir():
        local = {p.relative_to(local_dir).as_posix(): p.stat().st_size
                 for p in Path(local_dir).rglob("*") if p.is_file()}
        bad = sorted(k for k, size in local.items() if remote.get(k, -1) != size)
    else:
        bad = [] if remote else ["(nothing uploaded)"]
    if bad:
        raise XlpeftError(f"not registering run {run_id}: its artifacts under {artifact_path}/ are "
                          f"incomplete ({', '.join(bad[:5])} missing or of another size than in {local_dir})")


# ---- dataset inputs and tables


def apply_inputs(c: Any, run_id: str, datasets: list[dict[str, Any]]) -> None:
    """Log ``datasets`` (records of :func:`dataset_record`) as the run's MLflow dataset inputs."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d.get("profile")),
                           tags=[InputTag(CONTEXT_TAG, d["context"])]) for d in datasets]
    c.log_inputs(run_id, datasets=inputs)


def apply_table(c: Any, run_id: str, artifact_file: str, columns: list[str], data: list[list[Any]]) -> None:
    """Write a table as ``mlflow.log_table`` does (JSON ``{columns, data}`` + the ``mlflow.loggedArtifacts`` run tag).

    Unlike ``log_table`` an existing file is replaced, not appended to, so a replayed call logs the table once.
    """
    folder, filename = posixpath.split(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_text(json.dumps({"columns": columns, "data": data}), encoding="utf-8")
        c.log_artifact(run_id, str(path), folder or None)
    logged = json.loads(c.get_run(run_id).data.tags.get(LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in logged:
        c.set_tag(run_id, LOGGED_ARTIFACTS, json.dumps([*logged, entry]))


def dataset_record(context: str, spec: str, path: Path | None = None, sha256: str | None = None,
                   hf: str | None = None, revision: str | None = None, rows: int | None = None) -> dict[str, Any]:
    """One dataset input of a run, as a JSON-able record the spool can hold.

    Args:
        context: ``train`` or ``eval`` (the ``mlflow.data.context`` tag).
        spec: what the user named (a path, ``hf:NAME:CONFIG:SPLIT``).
        path: a local file: its sha256 is the digest (``sha256``, if the caller has it already, saves a read).
        hf: the hub dataset id of an ``hf:`` spec, whose digest is the sha256 of the spec and ``revision``.
        rows: examples or lines read, if known (shown in the dataset's profile).
    """
    if path is not None:
        full = sha256 or sha256_file(path)
        name, source_type, source = path.name, "local", {"uri": str(path.resolve())}
    else:
        full = hashlib.sha256(f"{spec}\0{revision or ''}".encode()).hexdigest()
        name, source_type, source = hf or spec, "hugging_face", {"path": hf or spec, "revision": revision}
    profile = {"sha256": full, "spec": spec, **({"rows": rows} if rows is not None else {})}
    return {"name": name, "digest": full[:16], "source_type": source_type, "source": json.dumps(source),
            "profile": json.dumps(profile), "context": context}


# ---- descriptions


def _metric_text(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))


def parents_of(tags: dict[str, str]) -> list[str]:
    """The numbered ``xlpeft.parent.<i>`` tags' modules in order (a fusion's fused modules, a merge's inputs)."""
    numbered = {int(k.rsplit(".", 1)[1]): v for k, v in tags.items()
                if k.startswith("xlpeft.parent.") and k.rsplit(".", 1)[1].isdigit()}
    return [numbered[i] for i in sorted(numbered)]


def module_description(manifest: Any, registered_name: str = "", parents: list[str] | None = None) -> str:
    """A version's description (Markdown): a one-line summary, then what it was trained on, steps, metrics, parents.

    ``xlpeft modules`` shows the first line; the MLflow UI shows all of it on the version's page.
    """
    training, base = manifest.training, manifest.base
    what = manifest.lang if manifest.kind == "language" else f"{manifest.task} (trained on {manifest.lang})"
    steps = training.get("steps")
    if manifest.kind == "language":
        headline = {k: training[k] for k in ("eval_loss", "eval_perplexity") if k in training}
        if "eval_loss_before" in training:
            headline["eval_loss_before"] = training["eval_loss_before"]
        data = training.get("corpora") or []
    else:
        from xlpeft.metrics import METRICS

        key = METRICS.get(training.get("metric", ""), training.get("metric"))  # span_f1 -> f1
        evals = training.get("eval") or {}
        headline = {k.removeprefix("eval_"): v for k, v in evals.items() if k.removeprefix("eval_") in (key, "loss")}
        data = training.get("train_data") or []
    parent = manifest.extra.get("lang_module") or {}
    parent_text = (f"{parent['registered_name']} v{parent['version']}" if parent.get("registered_name")
                   else parent.get("path", "")) if isinstance(parent, dict) else str(parent)
    parent_text = ", ".join(([parent_text] if parent_text else []) + list(parents or []))
    summary = (f"{manifest.kind} module {what} · {manifest.method} · base {base.get('name')} · {steps} steps"
               + (f" · {_metric_text(headline)}" if headline else ""))
    lines = [summary, "", f"- trained on: {', '.join(map(str, data)) or 'unknown'}",
             f"- base: {base.get('name')} (fingerprint {base.get('fingerprint')})",
             f"- method: {manifest.method}, {manifest.trainable_parameters:,} trainable parameters",
             f"- steps: {steps}, seed {training.get('seed')}"]
    if headline:
        lines.append(f"- metrics: {_metric_text(headline)}")
    lines.append(f"- parent modules: {parent_text or 'none (trained on the bare base)'}")
    if registered_name:
        lines.append(f"- use: `xlpeft compose ... --module {registered_name}@VERSION`, or "
                     f"`xlpeft promote {registered_name} VERSION --alias production`")
    return "\n".join(lines)


def composition_description(tags: dict[str, str], name: str = "") -> str:
    """A registered composition's description (Markdown) from its run tags: the blocks, the base, the parents."""
    parents = [f"{k.removeprefix('xlpeft.parent.')}: {v}" for k, v in tags.items() if k.startswith("xlpeft.parent.")]
    lines = [f"composition {tags.get('xlpeft.task')} in {tags.get('xlpeft.lang')} · {tags.get('xlpeft.method')} · "
             f"base {tags.get('xlpeft.base')}", "",
             f"- blocks: {tags.get('xlpeft.composition', '?')}",
             f"- base: {tags.get('xlpeft.base')} (fingerprint {tags.get('xlpeft.base_fingerprint')})",
             *(f"- parent {p}" for p in parents)]
    if name:
        lines.append(f"- use: `mlflow.pyfunc.load_model('models:/{name}@latest')` or "
                     f"`xlpeft.mlflow.load_model('models:/{name}@latest')`")
    return "\n".join(lines)


def corpus_datasets(corpora: Iterable[Any], sha256_of: Any = None) -> list[dict[str, Any]]:
    """Dataset records (context ``train``) of a language module's corpora (:class:`~xlpeft.data.corpora.CorpusSpec`).

    Args:
        sha256_of: path -> sha256 of a local corpus (``check_text_file``, memoised), so a 10 GB corpus is not re-read.
    """
    out = []
    for spec in corpora:
        if spec.path:
            path = Path(spec.path)
            out.append(dataset_record("train", spec.describe(), path, sha256_of(path) if sha256_of else None))
        else:
            out.append(dataset_record("train", spec.describe(), hf=spec.hf))
    return out


def task_datasets(sources: list[Any], train_examples: int, eval_examples: int) -> list[dict[str, Any]]:
    """Dataset records of a task module's data (:class:`~xlpeft.data.tasks.TaskSource`): training first, then eval."""
    out = []
    for i, source in enumerate(sources):
        context, rows = ("train", train_examples) if i == 0 else ("eval", eval_examples)
        path = source.local_path()
        if path is not None:
            out.append(dataset_record(context, source.describe(), path, rows=rows))
        else:
            out.append(dataset_record(context, source.describe(), hf=source.hf, rows=rows))
    return out
