"""The issue's grep proofs, as tests: generic code knows no method by name and probes for no method hook.

Only ``xlpeft/methods/`` (the methods themselves) and ``xlpeft/interop/`` (format converters,
which map one foreign format onto one method) may name a method. Everything else goes through
the :class:`~xlpeft.methods.base.MethodSpec` and the handle protocols.
"""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import xlpeft
from xlpeft.methods.base import Applied, MethodSpec, Trainable
from xlpeft.registry import method_names

PACKAGE = Path(xlpeft.__file__).parent
ALLOWED_TO_KNOW_METHODS = ("methods", "interop")
MAX_LINES = 400

# Hooks the 0.1 code discovered with hasattr/getattr, plus every declared member of the protocols:
# probing for a declared member means the protocol is not trusted.
HOOK_NAMES = {"defaults_for", "train_defaults_for", "DROPPED_BY", "check_against", "with_epochs", "indices", "module",
              "delta", "values", "hooks", "phases"}
HOOK_NAMES |= {f.name for f in fields(MethodSpec)} - {"name", "help"}  # too generic to be a hook
HOOK_NAMES |= {n for proto in (Trainable, Applied) for n in vars(proto) if not n.startswith("_")}


def generic_files() -> list[Path]:
    """Every ``.py`` file of the package outside the method packages and the converters."""
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if p.relative_to(PACKAGE).parts[0] not in ALLOWED_TO_KNOW_METHODS)


def _strings(node: ast.AST) -> list[str]:
    """String constants of an expression that can be compared with: a literal, or a tuple/list/set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [s for elt in node.elts for s in _strings(elt)]
    return []


def method_name_uses(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each comparison with a method name, dict keyed by one, or ``case "<name>"``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                found += [(node.lineno, f"compares with {s!r}") for s in _strings(side) if s in names]
        elif isinstance(node, ast.Dict):
            found += [(node.lineno, f"a table keyed by {k.value!r}") for k in node.keys
                      if isinstance(k, ast.Constant) and k.value in names]
        elif isinstance(node, ast.MatchValue):
            found += [(node.lineno, f"case {s!r}") for s in _strings(node.value) if s in names]
    return found


def hook_probes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each ``hasattr(x, "<hook>")`` / ``getattr(x, "<hook>", ...)``."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in HOOK_NAMES):
            found.append((node.lineno, f"{node.func.id}(..., {node.args[1].value!r})"))
    return found


def _report(check) -> list[str]:
    out = []
    for path in generic_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        out += [f"{path.relative_to(PACKAGE.parent)}:{line}: {what}" for line, what in check(tree)]
    return out


def test_the_scanners_find_what_they_look_for():
    """The checks below can fail: each pattern they exist for is caught in a sample."""
    sample = ast.parse(
        'if spec.method == "sft": pass\n'
        'if "adapter" != m: pass\n'
        'ok = method in ("sft", "lora")\n'
        'COMBINE = {"adapter": "stack"}\n'
        'match name:\n    case "sft": pass\n'
        'if hasattr(cfg, "defaults_for"): pass\n'
        'f = getattr(spec, "with_epochs", None)\n'
        'g = getattr(head, "bias", None)\n'
    )
    uses = method_name_uses(sample, {"sft", "adapter"})
    assert [line for line, _ in uses] == [1, 2, 3, 4, 6], uses
    assert [line for line, _ in hook_probes(sample)] == [7, 8]


def test_no_generic_code_compares_with_a_method_name():
    names = set(method_names())
    assert {"adapter", "sft"} <= names
    found = _report(lambda tree: method_name_uses(tree, names))
    assert not found, "generic code knows methods by name (use the MethodSpec):\n" + "\n".join(found)


def test_no_generic_code_probes_for_method_hooks():
    found = _report(hook_probes)
    assert not found, "hasattr/getattr probes for method hooks (declare them in methods/base.py):\n" + "\n".join(found)


def _runtime_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imported module names outside ``if TYPE_CHECKING:`` blocks, anywhere in the file (functions included)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            out += [(node.lineno, f"{module}.{a.name}" if module else a.name) for a in node.names]
    return out


def test_registry_imports_nothing_of_the_methods_at_runtime():
    tree = ast.parse((PACKAGE / "registry.py").read_text(encoding="utf-8"))
    imports = _runtime_imports(tree)
    assert any(name.startswith("xlpeft.errors") for _, name in imports), "the scan sees the registry's imports"
    bad = [f"registry.py:{line}: {name}" for line, name in imports if name.startswith("xlpeft.methods")]
    assert not bad, bad
    sample = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from xlpeft.methods.base import X\n"
                       "def f():\n    from xlpeft.methods import sft\n")
    assert [name for _, name in _runtime_imports(sample)] == ["typing.TYPE_CHECKING", "xlpeft.methods.sft"]


def method_packages() -> set[str]:
    """The module (``xlpeft.methods.adapters``) or package (``xlpeft.methods.sft``) of each registered method."""
    from xlpeft.registry import get_method

    return {".".join(get_method(n).prepare.__module__.split(".")[:3]) for n in method_names()}


def test_no_generic_code_imports_a_particular_method():
    """Generic code reaches a method through the registry, never by importing its module."""
    packages = method_packages()
    assert {"xlpeft.methods.adapters", "xlpeft.methods.sft"} <= packages
    found = []
    for path in generic_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [f"{path.relative_to(PACKAGE.parent)}:{line}: imports {name}" for line, name in _runtime_imports(tree)
                  if any(name == p or name.startswith(p + ".") for p in packages)]
    assert not found, "generic code imports a method's own module (use get_method):\n" + "\n".join(found)


def test_no_source_file_exceeds_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (make them packages): {long}"
