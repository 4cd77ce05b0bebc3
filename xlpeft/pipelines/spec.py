"""Pipelines: YAML files under ``pipelines/`` listing xlpeft commands to run in order.

A pipeline is data, not code: ``steps`` is a list of argument lists (or strings split like a
shell would), each one an ``xlpeft`` sub-command.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from xlpeft.errors import XlpeftError
from xlpeft.packs import load_yaml


def load_pipeline(path: Path) -> list[list[str]]:
    """Read and validate a pipeline file; returns the argument list of every step."""
    if not path.is_file():
        raise XlpeftError(f"pipeline {path} does not exist; see pipelines/ for examples")
    data = load_yaml(path)
    unknown = set(data) - {"name", "description", "steps"}
    if unknown:
        shown = ", ".join(repr(str(k)[:40]) for k in sorted(map(str, unknown))[:10])
        raise XlpeftError(f"{path}: unknown keys {shown}{' ...' if len(unknown) > 10 else ''}; "
                          "expected name, description, steps")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise XlpeftError(f"{path}: `steps` should be a non-empty list of xlpeft commands")
    out = []
    for i, step in enumerate(steps, 1):
        if isinstance(step, str):
            try:
                args = shlex.split(step)
            except ValueError as exc:
                raise XlpeftError(f"{path}: step {i} cannot be split like a shell command ({exc})") from None
        elif isinstance(step, list) and all(isinstance(a, (str, int, float)) for a in step):
            args = [str(a) for a in step]
        else:
            shown = repr(step) if len(repr(step)) <= 120 else f"{repr(step)[:120]}... ({type(step).__name__})"
            raise XlpeftError(f"{path}: step {i} should be a string or a list of arguments; got {shown}")
        if not args or args[0] == "run":
            raise XlpeftError(f"{path}: step {i} is empty or nests `run`")
        out.append(args)
    return out
