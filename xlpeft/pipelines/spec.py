"""Pipeline files: YAML under ``pipelines/`` listing xlpeft commands to run in order, with variables and fan-out.

A pipeline is data, not code::

    vars:                      # defaults; `xlpeft run FILE --var langs=sw,yo` overrides one
      base: xlmr               # each with a comment saying what it is
      langs: sw,yo,ha          # a comma-separated string or a YAML list
    steps:
      - [prepare-base, "${base}"]                 # a list of arguments (or one string, split like a shell)
      - for_each: {lang: "${langs}"}              # one step per item, in order
        run: [train-lang, --lang, "${lang}", --base, "${base}"]

``${name}`` is replaced inside any argument (a list variable joins with commas); ``$${`` writes a
literal ``${``. With several ``for_each`` keys the steps are their product, the first key outermost.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlpeft.errors import XlpeftError
from xlpeft.io import brief
from xlpeft.packs import load_yaml

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REFERENCE = re.compile(r"\$(\$)?\{([^{}]*)\}")  # ${name}, or $${...} for a literal ${...}
Value = str | list[str]


@dataclass(frozen=True)
class Step:
    """One command of an expanded pipeline: ``number`` is the step's place in the file, ``bindings`` its for_each values."""

    number: int
    args: tuple[str, ...]
    bindings: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        return "xlpeft " + shlex.join(self.args)


@dataclass(frozen=True)
class Pipeline:
    path: Path
    name: str
    variables: dict[str, Value]  # defaults with the --var overrides applied
    steps: list[Step] = field(default_factory=list)


def _scalar(value: Any) -> str | None:
    """A YAML scalar as the text a command line gets (``true``/``false`` for booleans); None if not a scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def _variables(path: Path, raw: Any, overrides: dict[str, str]) -> dict[str, Value]:
    """The ``vars:`` mapping checked, with ``--var`` overrides; an unknown override names the defined ones."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise XlpeftError(f"{path}: `vars` should be a mapping of name: default; got {brief(raw)}")
    out: dict[str, Value] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise XlpeftError(f"{path}: variable name {brief(name, 40)} should be letters, digits and _ "
                              "(not starting with a digit)")
        text = _scalar(value)
        if isinstance(value, list) and all(_scalar(v) is not None for v in value):
            out[name] = [_scalar(v) for v in value]
        elif text is not None:
            out[name] = text
        else:
            raise XlpeftError(f"{path}: variable {name} should default to a string, a number or a list of them; "
                              f"got {brief(value)}")
    unknown = sorted(set(overrides) - set(out))
    if unknown:
        raise XlpeftError(f"--var {', '.join(unknown)}: not a variable of {path}; it defines "
                          f"{', '.join(sorted(out)) or 'no variables'}")
    return {**out, **overrides}


def substitute(text: str, variables: dict[str, Value], missing: list[str]) -> str:
    """``text`` with every ``${name}`` replaced; undefined names are appended to ``missing`` (left as written)."""
    def one(match: re.Match) -> str:
        if match.group(1):
            return "${" + match.group(2) + "}"
        name = match.group(2)
        if name not in variables:
            missing.append(name)
            return match.group(0)
        value = variables[name]
        return ",".join(value) if isinstance(value, list) else value

    return REFERENCE.sub(one, text)


def _arguments(path: Path, number: int, step: Any) -> list[str]:
    """A step's arguments as written (before substitution): a list of scalars, or one string split like a shell."""
    if isinstance(step, str):
        try:
            return shlex.split(step)
        except ValueError as exc:
            raise XlpeftError(f"{path}: step {number} cannot be split like a shell command ({exc})") from None
    if isinstance(step, list) and all(_scalar(a) is not None for a in step):
        return [_scalar(a) for a in step]
    raise XlpeftError(f"{path}: step {number} should be a string or a list of arguments; got {brief(step)}")


def _loop(path: Path, number: int, raw: Any, variables: dict[str, Value], missing: list[str]) -> list[dict[str, str]]:
    """The bindings a ``for_each`` mapping expands to, in order (first key outermost)."""
    if not isinstance(raw, dict) or not raw:
        raise XlpeftError(f"{path}: step {number}: `for_each` should map a loop variable to a list, e.g. "
                          f"for_each: {{lang: \"${{langs}}\"}}; got {brief(raw)}")
    axes = []
    for name, items in raw.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise XlpeftError(f"{path}: step {number}: loop variable {brief(name, 40)} should be letters, digits and _")
        if name in variables:
            raise XlpeftError(f"{path}: step {number}: loop variable {name} is also a pipeline variable; rename one")
        if isinstance(items, str):
            values = [v.strip() for v in substitute(items, variables, missing).split(",") if v.strip()]
        elif isinstance(items, list) and all(_scalar(v) is not None for v in items):
            values = [substitute(_scalar(v), variables, missing) for v in items]
        else:
            raise XlpeftError(f"{path}: step {number}: for_each {name} should be a list or a comma-separated "
                              f"string; got {brief(items)}")
        if not values and not missing:
            raise XlpeftError(f"{path}: step {number}: for_each {name} is empty ({brief(items, 60)}); give it "
                              "at least one value")
        axes.append([(name, v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)]


def _expand(path: Path, number: int, step: Any, variables: dict[str, Value], missing: list[str]) -> list[Step]:
    bindings: list[dict[str, str]] = [{}]
    if isinstance(step, dict):
        unknown = sorted(map(str, set(step) - {"run", "for_each"}))
        if unknown or "run" not in step:
            shown = ", ".join(brief(k, 40) for k in unknown[:5]) or "no `run`"
            raise XlpeftError(f"{path}: step {number} as a mapping takes `run` (the command) and `for_each`; "
                              f"got {shown}")
        if "for_each" in step:
            bindings = _loop(path, number, step["for_each"], variables, missing)
        step = step["run"]
    args = _arguments(path, number, step)
    out = []
    for binding in bindings:
        expanded = [substitute(a, {**variables, **binding}, missing) for a in args]
        if not expanded or expanded[0] == "run":
            raise XlpeftError(f"{path}: step {number} is empty or nests `run`")
        out.append(Step(number, tuple(expanded), tuple(binding.items())))
    return out


def load_pipeline(path: Path, overrides: dict[str, str] | None = None) -> Pipeline:
    """Read and validate a pipeline file, apply ``--var`` overrides and expand every step.

    Raises:
        XlpeftError: unknown keys, a malformed step, an unknown ``--var``, or ``${x}`` naming no
            variable (one error listing every undefined name and the defined ones).
    """
    path = Path(path)
    if not path.is_file():
        raise XlpeftError(f"pipeline {path} does not exist; see pipelines/ for examples")
    data = load_yaml(path)
    unknown = set(data) - {"name", "description", "vars", "steps"}
    if unknown:
        shown = ", ".join(repr(str(k)[:40]) for k in sorted(map(str, unknown))[:10])
        raise XlpeftError(f"{path}: unknown keys {shown}{' ...' if len(unknown) > 10 else ''}; "
                          "expected name, description, vars, steps")
    variables = _variables(path, data.get("vars"), dict(overrides or {}))
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise XlpeftError(f"{path}: `steps` should be a non-empty list of xlpeft commands")
    missing: list[str] = []
    expanded = [s for number, step in enumerate(steps, 1) for s in _expand(path, number, step, variables, missing)]
    if missing:
        names = ", ".join(f"${{{n}}}" for n in dict.fromkeys(missing))
        raise XlpeftError(f"{path}: undefined variable {names}; defined: {', '.join(sorted(variables)) or 'none'} "
                          "(add it under `vars:` with a default, or fix the name)")
    return Pipeline(path, str(data.get("name") or path.stem), variables, expanded)


def parse_vars(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``--var name=value`` pairs (repeatable) as a mapping; a pair without ``=`` is an error showing the form."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not NAME.fullmatch(name.strip()):
            raise XlpeftError(f"--var should be NAME=VALUE (e.g. --var langs=sw,yo); got {brief(pair, 80)}")
        out[name.strip()] = value
    return out
