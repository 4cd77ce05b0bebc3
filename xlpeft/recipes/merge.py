"""``xlpeft merge``: several delta modules merged into one new module, saved, logged and registered.

The arithmetic is :mod:`xlpeft.merging`; this recipe resolves the inputs (directories or registered
``NAME[@VERSION]``), loads the base they were trained on, and publishes the result like a trained
module, with lineage to every parent (run tags ``xlpeft.parent.<i>`` and ``merged_from`` in its
manifest).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xlpeft import tracking
from xlpeft.compose import resolve_module
from xlpeft.distributed import Dist
from xlpeft.errors import XlpeftError
from xlpeft.io import check_module_output, load_module
from xlpeft.merging import MergeConfig, check_mergeable, merge_modules
from xlpeft.models import load_base
from xlpeft.packs import language_name
from xlpeft.recipes.common import run_tags
from xlpeft.tracking.lifecycle import publish


@dataclass(frozen=True)
class MergeRequest:
    sources: tuple[str, ...]  # module directories or registered NAME[@VERSION], in the order of the weights
    output: str
    config: MergeConfig = field(default_factory=MergeConfig)
    name: str | None = None  # the merged language module's language (default: the parents', or lang1+lang2)
    base: str | None = None  # default: the base the modules name (their fingerprints must match it)
    overwrite: bool = False


@dataclass
class MergeResult:
    output: Path
    run_id: str | None
    registered_name: str
    version: str
    method: str
    num_entries: int


def merged_name(modules, explicit: str | None) -> str:
    """The merged module's language (language modules) or task: ``--name``, else the parents' own, joined by ``+``."""
    if explicit:
        return explicit
    first = modules[0].manifest
    if first.kind == "task":
        return first.task
    return "+".join(dict.fromkeys(m.manifest.lang for m in modules))


def merge(req: MergeRequest) -> MergeResult:
    """Merge ``req.sources`` into one module at ``req.output``, in an MLflow run, registered with lineage."""
    refs = [resolve_module(src) for src in req.sources]
    modules = [ref.module for ref in refs]
    check_mergeable(modules)
    first = modules[0].manifest
    out_dir = check_module_output(req.output, first.kind, req.overwrite)
    base = load_base(req.base or first.base["name"])
    if base.fingerprint != first.base["fingerprint"]:
        raise XlpeftError(f"the modules were trained on base {first.base.get('name')} ({first.base['fingerprint']}), "
                          f"but {base.name} has fingerprint {base.fingerprint}; pass --base with those weights")
    name = merged_name(modules, req.name)
    manifest, tensors = merge_modules(modules, base, req.config, name)
    lang = manifest.lang or "none"
    tags = run_tags(first.kind, lang, language_name(lang) if first.kind == "language" and "+" not in lang else lang,
                    manifest.task, manifest.method, base)
    tags |= {f"xlpeft.parent.{i}": ref.source for i, ref in enumerate(refs)}
    tags |= {"xlpeft.merge_method": req.config.method}
    params = {"sources": ", ".join(ref.source for ref in refs), **{f"merge.{k}": v for k, v in asdict(req.config).items()},
              "merge.weights": ", ".join(f"{w:g}" for w in req.config.weights_for(len(refs))), "output": str(out_dir)}
    registered = tracking.registered_name(first.kind, name if first.kind == "language" else manifest.task,
                                          manifest.method)
    entries = manifest.trainable_parameters
    with tracking.tracked_run(f"merge-{req.config.method}-{name}", tags, params) as tracker:
        with tempfile.TemporaryDirectory() as tmp:
            version = publish(tracker, Dist(), out_dir, manifest, tensors, registered, tags, 0, Path(tmp) / "none")
        tracker.log_metrics({"merged_entries": entries, "parents": len(refs)}, 0)
    load_module(out_dir)
    return MergeResult(out_dir, tracker.run_id, registered, version, manifest.method, entries)
