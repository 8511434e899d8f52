"""Sizes the house style asks for, measured with `ast`: modules under ~300 lines, functions under ~60.

A module or function over its limit fails with its name and size; the allow-lists are explicit and short, each
with the reason splitting would hurt (or the change that is about to split it).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jaxreshard"
MODULE_LINES = 300
FUNCTION_LINES = 60

# module (relative to the package) -> why it may be longer for now
MODULE_ALLOW: dict[str, str] = {}
# "module:function" -> why it may be longer
FUNCTION_ALLOW: dict[str, str] = {}


def module_sizes() -> dict[str, int]:
    return {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in sorted(PACKAGE.rglob("*.py"))}


def function_sizes(path: Path, root: Path = PACKAGE) -> dict[str, int]:
    """Lines of every function and method, as "module:name" (decorators excluded; a nested function counts in
    its parent too; of two functions with one name in a module, the longer)."""
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            key = f"{path.relative_to(root).as_posix()}:{node.name}"
            out[key] = max(out.get(key, 0), (node.end_lineno or node.lineno) - node.lineno + 1)
    return out


def test_function_sizes_are_measured(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("@dec\ndef f(x):\n    y = x\n\n    return y\n\n\nclass C:\n    def g(self):\n        pass\n")
    assert function_sizes(src, tmp_path) == {"m.py:f": 4, "m.py:g": 2}


def test_modules_are_small():
    big = {m: n for m, n in module_sizes().items() if n > MODULE_LINES and m not in MODULE_ALLOW}
    assert big == {}, f"modules over {MODULE_LINES} lines: split them by what they do"


def test_functions_are_short():
    sizes: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        sizes.update(function_sizes(path))
    long = {f: n for f, n in sizes.items() if n > FUNCTION_LINES and f not in FUNCTION_ALLOW}
    assert long == {}, f"functions over {FUNCTION_LINES} lines: split them into named steps"


def test_the_allow_lists_are_needed():
    """An exception that no longer applies leaves its list (else it would hide a new offender)."""
    modules = module_sizes()
    assert [m for m in MODULE_ALLOW if modules.get(m, 0) <= MODULE_LINES] == []
    sizes: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        sizes.update(function_sizes(path))
    assert [f for f in FUNCTION_ALLOW if sizes.get(f, 0) <= FUNCTION_LINES] == []
