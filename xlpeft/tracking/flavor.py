"""The ``xlpeft`` MLflow model flavor: a module or composition directory that is also an MLflow Model.

:func:`write_mlmodel` writes ``MLmodel`` (flavors ``xlpeft`` and ``python_function``), a signature
and an input example *into* the directory before it is uploaded, so the registered artifact is the
module itself (``find_module`` keeps downloading it, ``load_module`` reads only the files the manifest
lists) and ``mlflow.pyfunc.load_model("models:/NAME/1")`` works on it. The base is referenced by
name and fingerprint, never copied: :func:`load_flavor` loads it with :func:`~xlpeft.models.load_base`
and refuses one whose fingerprint differs. The pyfunc (:class:`XlpeftPyfunc`) predicts what
``xlpeft predict`` prints: word tags (token tasks), a label (``premise<TAB>hypothesis``, NLI), or the
top fillers of the mask token (a language module, through its MLM head).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from xlpeft.errors import XlpeftError
from xlpeft.io import MANIFEST, Manifest, load_module

FLAVOR = "xlpeft"
MLMODEL = "MLmodel"
MODEL_FILES = (MLMODEL, "input_example.json", "serving_input_example.json")  # what write_mlmodel adds to a folder
COMPOSITION = "composition.json"  # a composition's record: Composition.to_dict() + the folder of every leaf
LEAVES_DIR = "modules"
MASKS = ("[MASK]", "<mask>")  # either spelling is accepted and replaced by the base's own mask token
TOP_K = 5
_EXAMPLES = {"token_classification": ["Juma alikwenda Nairobi"],
             "sequence_classification": ["A man is playing a guitar.\tA person plays music."],
             "language": ["Watu wote [MASK] huru"]}


def _example(kind: str, head: str | None) -> list[str]:
    return _EXAMPLES["language" if kind == "language" else head or "token_classification"]


def write_mlmodel(directory: str | Path, kind: str, base: dict[str, str], head: str | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Make ``directory`` an MLflow Model of the ``xlpeft`` flavor; returns the ``MLmodel`` path.

    Args:
        kind: ``language``, ``task`` or ``composition``.
        base: the base as a manifest records it (``name``, ``fingerprint``, ``model_type``).
        head: the task head kind (``token_classification`` / ``sequence_classification``), None for MLM.
        extra: more keys for the flavor's configuration (e.g. a composition's registered parents).
    """
    import mlflow
    from mlflow.models import Model
    from mlflow.models.signature import ModelSignature
    from mlflow.models.utils import _save_example
    from mlflow.types import ColSpec, Schema

    from xlpeft import __version__

    directory = Path(directory)
    model = Model()
    model.signature = ModelSignature(inputs=Schema([ColSpec("string")]))  # unnamed: a list of sentences
    _save_example(model, _example(kind, head), str(directory))
    model.add_flavor(FLAVOR, kind=kind, head=head or "mlm", base=base.get("name", ""),
                     base_fingerprint=base.get("fingerprint", ""), model_type=base.get("model_type", ""),
                     xlpeft_version=__version__, **(extra or {}))
    # model_config: ``base`` may be overridden at load time (a local copy of the base; its fingerprint is checked)
    mlflow.pyfunc.add_to_model(model, loader_module="xlpeft.tracking.flavor", model_config={"base": ""})
    model.mlflow_version = mlflow.__version__
    path = directory / MLMODEL
    model.save(str(path))
    return path


def write_module_mlmodel(directory: str | Path, manifest: Manifest) -> Path:
    """:func:`write_mlmodel` for a saved language or task module (``xlpeft/tracking/lifecycle.publish``)."""
    return write_mlmodel(directory, manifest.kind, manifest.base, manifest.extra.get("head"))


def write_composition_model(target: Path, composition, base, parents: dict[str, str]) -> Path:
    """Write a composition as an MLflow Model: the record, every leaf's module folder, ``MLmodel``.

    The leaves are copied (manifest and listed tensors only), so loading it never needs the registry.
    """
    target.mkdir(parents=True, exist_ok=True)
    folders = {}
    for i, leaf in enumerate(composition.leaves()):
        sub = target / LEAVES_DIR / str(i)
        sub.mkdir(parents=True)
        for name in (MANIFEST, *leaf.module.manifest.files):
            shutil.copy2(Path(leaf.module.path) / name, sub / name)
        folders[str(i)] = f"{LEAVES_DIR}/{i}"
    record = {**composition.to_dict(), "leaves": folders}
    (target / COMPOSITION).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    task = composition.task
    head = task.module.manifest.extra.get("head") if task is not None else None
    base_record = {"name": base.name, "fingerprint": base.fingerprint, "model_type": base.model.config.model_type}
    return write_mlmodel(target, "composition", base_record, head, {"parents": parents})


# ---- loading


def flavor_conf(path: Path) -> dict[str, Any]:
    """The ``xlpeft`` flavor's configuration in ``path/MLmodel``."""
    from mlflow.models import Model

    if not (path / MLMODEL).is_file():
        raise XlpeftError(f"{path} is not an MLflow model: no {MLMODEL} in it; log the module with xlpeft 0.2 or later")
    conf = Model.load(str(path / MLMODEL)).flavors.get(FLAVOR)
    if conf is None:
        raise XlpeftError(f"{path / MLMODEL} has no {FLAVOR!r} flavor; it was not written by xlpeft")
    return conf


def load_checked_base(conf: dict[str, Any], override: str | None = None):
    """The base the flavor names (or ``override``, a local copy), refused if its fingerprint differs."""
    from xlpeft.models import load_base

    base = load_base(override or conf["base"])
    if base.fingerprint != conf["base_fingerprint"]:
        raise XlpeftError(f"the model was logged on base {conf['base']!r} (fingerprint {conf['base_fingerprint']}), "
                          f"but {base.name!r} has fingerprint {base.fingerprint}; load it with the same base "
                          "(model_config={'base': PATH} points at a local copy)")
    return base


def _parent_of(task) -> list:
    """The task module under its recorded source-language module, or a clear error when that one is gone."""
    from xlpeft.lineage import baseline_language_module

    lineage = task.manifest.extra.get("lang_module") or {}
    parent = baseline_language_module(task, task.manifest.base["fingerprint"])
    if parent is None and lineage:
        name = (f"{lineage['registered_name']} version {lineage.get('version')}" if lineage.get("registered_name")
                else lineage.get("path", "?"))
        raise XlpeftError(f"task module {task.path} was trained over language module {name}, which is neither "
                          f"registered nor on disk; register it again (xlpeft train-lang --lang {lineage.get('lang')}) "
                          "or serve the composition (xlpeft compose --register)")
    return [task] if parent is None else [parent, task]


def composition_from(path: Path):
    """The composition logged in ``path`` with every leaf bound to its copied module folder."""
    import dataclasses

    from xlpeft.compose import Composition, ModuleRef

    record = json.loads((path / COMPOSITION).read_text(encoding="utf-8"))
    composition = Composition.from_dict(record)
    leaves = composition.leaves()
    bound = {id(leaf): ModuleRef.of(load_module(path / record["leaves"][str(i)]), leaf.source)
             for i, leaf in enumerate(leaves)}

    def rebuild(node):
        return bound[id(node)] if isinstance(node, ModuleRef) else type(node)(*(rebuild(c) for c in node.children))

    return dataclasses.replace(composition, root=rebuild(composition.root))


def load_flavor(path: str | Path, base_override: str | None = None) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(the composed model, its base, the flavor configuration) of an ``xlpeft`` MLflow Model directory.

    Raises:
        XlpeftError: no ``xlpeft`` flavor, a base with another fingerprint, or a task module whose
            recorded source-language module cannot be found.
    """
    from xlpeft.compose import compose

    path = Path(path)
    conf = flavor_conf(path)
    base = load_checked_base(conf, base_override)
    if conf["kind"] == "composition":
        model = compose(base, composition_from(path))
    else:
        module = load_module(path)  # reads only the manifest's files: MLmodel and the examples are ignored
        model = compose(base, _parent_of(module) if module.manifest.kind == "task" else [module])
    return model, base, conf


@dataclass
class XlpeftPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(sentences)`` as ``xlpeft predict`` answers them."""

    model: nn.Module
    base: Any
    conf: dict[str, Any]

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[Any]:
        """Word tags per sentence (token task), a label per ``premise<TAB>hypothesis`` (NLI), mask fillers (MLM)."""
        lines = sentences_of(model_input)
        if self.conf["kind"] == "language":
            return fill_mask(self.model, self.model.xlpeft_tokenizer, lines, int((params or {}).get("top_k", TOP_K)))
        from xlpeft.packs import load_task_pack
        from xlpeft.recipes.predict import predict_with

        task = self.model.xlpeft_composition.task
        pack = load_task_pack(task.module.manifest.task)
        return [pred for _, pred in predict_with(self.model, pack, self.model.xlpeft_tokenizer, lines)]  # + new words


def sentences_of(model_input: Any) -> list[str]:
    """A list of str from a list, a one-column DataFrame, ``{"inputs": [...]}``/``{"text": [...]}`` or an array."""
    import numpy as np
    import pandas as pd

    data = model_input
    if isinstance(data, dict):
        data = next((data[k] for k in ("inputs", "text") if k in data), None)
    if isinstance(data, pd.DataFrame):
        if data.shape[1] != 1:
            raise XlpeftError(f"expected a DataFrame with one text column; got columns {list(data.columns)[:8]}")
        data = data.iloc[:, 0].tolist()
        if data and all(isinstance(cell, list | np.ndarray) for cell in data):  # {"inputs": [...]} as MLflow frames it
            data = [s for cell in data for s in cell]
    elif isinstance(data, pd.Series | np.ndarray):
        data = list(np.asarray(data).reshape(-1))
    elif isinstance(data, str):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
        raise XlpeftError(f"expected sentences: a list of str, a one-column DataFrame or {{\"inputs\": [...]}}; "
                          f"got {type(model_input).__name__}")
    return data


def fill_mask(model: nn.Module, tokenizer, lines: list[str], top_k: int = TOP_K) -> list[list[str]]:
    """The ``top_k`` fillers of the (first) mask token of each sentence, best first."""
    import torch

    out = []
    for line in lines:
        text = line
        for mask in MASKS:
            text = text.replace(mask, tokenizer.mask_token)
        enc = tokenizer(text, return_tensors="pt", truncation=True)
        where = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()
        if not len(where):
            raise XlpeftError(f"a language module fills the mask token: expected {' or '.join(MASKS)} in each "
                              f"sentence; got {line[:80]!r}")
        with torch.no_grad():
            logits = model(**enc).logits[0, int(where[0])]  # (V,)
        out.append([tokenizer.decode([int(i)]).strip() for i in logits.topk(top_k).indices])
    return out


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> XlpeftPyfunc:
    """MLflow's entry point (``loader_module``): ``model_config={"base": PATH}`` points at a local copy of the base."""
    model, base, conf = load_flavor(path, (model_config or {}).get("base"))
    return XlpeftPyfunc(model, base, conf)
