"""xlpeft modules and compositions as MLflow Models: ``load_model`` gives the composed transformers model.

``mlflow.pyfunc.load_model(uri)`` gives the same model behind ``predict(sentences)``; this module is
for Python users who want the ``nn.Module`` itself (its logits, its ``xlpeft_composition``). Inside
it ``import mlflow`` is the real MLflow: imports are absolute.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from xlpeft.errors import XlpeftError


def local_copy(uri: str) -> Path:
    """A local directory holding the MLflow Model at ``uri`` (``models:/NAME/1``, ``models:/NAME@ALIAS``, ``runs:/``, a path)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if Path(uri).is_dir():
        return Path(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as exc:
        raise XlpeftError(f"cannot fetch the MLflow model {uri!r} from {mlflow.get_tracking_uri()}: "
                          f"{str(exc).splitlines()[0][:200]}; check the name and version (xlpeft modules)") from None


def load_model(uri: str, base: str | None = None) -> nn.Module:
    """The composed model of an ``xlpeft`` MLflow Model: what :func:`xlpeft.compose.compose` returns for its modules.

    Args:
        uri: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN/module`` or a local directory.
        base: a local copy of the base to load instead of the one the model names (its fingerprint is checked).

    Raises:
        XlpeftError: not an xlpeft model, a base with another fingerprint, or a task module's
            source-language module is gone.
    """
    from xlpeft.tracking.flavor import load_flavor

    model, _, _ = load_flavor(local_copy(uri), base)
    return model


def log_model(module_dir: str | Path, artifact_path: str = "module", registered_model_name: str | None = None) -> str:
    """Log a saved module directory to the active MLflow run as an ``xlpeft`` MLflow Model; returns its artifact URI.

    The directory gains ``MLmodel`` and ``input_example.json`` (``load_module`` ignores them).
    """
    import mlflow

    from xlpeft.io import load_module
    from xlpeft.tracking.flavor import write_module_mlmodel

    module = load_module(module_dir)
    write_module_mlmodel(module_dir, module.manifest)
    run = mlflow.active_run() or mlflow.start_run()
    mlflow.log_artifacts(str(module_dir), artifact_path)
    uri = f"runs:/{run.info.run_id}/{artifact_path}"
    if registered_model_name:
        mlflow.register_model(uri, registered_model_name)
    return uri
