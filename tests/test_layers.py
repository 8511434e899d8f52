"""The package's import graph, read with `ast` (nothing is imported): no cycle, and the layers import downward.

Layers, top to bottom: commands (cli, MindFormers shims) -> library API -> planners (native, the MindSpore wing)
-> executor -> plan (typed data) -> storage and formats (the ground floor). Every import of a jaxreshard module
counts, also one inside a function: a lazy import hides an edge, it does not remove it. An import under
`if TYPE_CHECKING:` (a type named in an annotation only) must go downward too, but is not run, so it may close a
cycle inside one layer: a recursive type such as the plan holding transforms and `LoraFold` holding the plan
that reads its factors.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxreshard"

# Leaf modules the ground floor may use: errors, limits, geometry, file reading and user values, none importing
# anything above formats/ (test_leaves_stay_leaves checks that).
FORMATS_MAY_IMPORT = {"jaxreshard.errors", "jaxreshard.caps", "jaxreshard.box", "jaxreshard.readfile",
                      "jaxreshard.saferegex"}  # fmt: skip
# Who may import the MindFormers shims: the package's public surface and the CLI (for its drop-in commands).
SHIM_USERS = {"jaxreshard", "jaxreshard.cli"}

# Every module's layer, top (0) to bottom, as the README's "Development" table draws them; a module imports only
# from its own layer and those below. A package (commands, planners, formats, mindspore, mindformers) is one entry.
# The plan is typed data: the planners build it and the executor runs it, so both sit above it.
LAYERS = {
    0: {"cli", "config", "commands", "quickstart", "example", "__main__", "mindformers"},  # commands, shims
    1: {"api", "load", "verify", "describe", "merge", "lora", "unify", "jobs"},  # library API
    2: {"planners", "mindspore"},  # planners and the MindSpore wing
    3: {"execute", "arrays", "run", "fill", "resume", "manifests", "integrity", "srccheck", "devices",
        "distributed"},  # executor
    4: {"plan", "paramsources", "transforms", "planstats", "coverage", "layout", "paramlayout", "rules", "rulemap",
        "composed", "fp8", "rankgroups"},  # plan
    5: {"fsutil", "fsops", "dstlock", "renameat", "remote"},  # storage (remote: object stores seen as folders)
    6: {"formats"},  # formats, storage.py (the byte-range seam) at their bottom: it imports only the stdlib
    7: {"errors", "caps", "box", "readfile", "saferegex", "yamlfile", "logs", "progress", "values"},  # leaves
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def type_only_nodes(tree: ast.Module) -> set[int]:
    """Ids of the import nodes under a module-level `if TYPE_CHECKING:` (annotations only, never run)."""
    blocks = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) in ("TYPE_CHECKING",
                                                                                        "typing.TYPE_CHECKING")]
    return {id(n) for b in blocks for n in ast.walk(b) if isinstance(n, (ast.Import, ast.ImportFrom))}


def imports_of(name: str, path: Path, known: set[str], *, runtime: bool = False) -> set[str]:
    """The jaxreshard modules `name` imports anywhere in its file (a `from pkg import sub` names the submodule);
    `runtime` leaves out the type-only imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = type_only_nodes(tree) if runtime else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "jaxreshard")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "jaxreshard":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            out.update(subs or {target})
            if len(subs) < len(node.names):
                out.add(target)
    return {m for m in out if m in known and m != name}


def graph(*, runtime: bool = False) -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found), runtime=runtime) for name, path in found.items()}


def test_the_graph_is_read():
    g = graph()
    assert "jaxreshard.plan" in g["jaxreshard.transforms"]  # a type-only import is an edge of the layers
    assert "jaxreshard.plan" not in graph(runtime=True)["jaxreshard.transforms"]  # but not of the cycle test
    assert "jaxreshard.mindspore.planner" in g["jaxreshard.mindspore"]  # re-exports resolve to the module
    assert "jaxreshard.api" in g["jaxreshard.mindformers.auto"]  # `from .. import api` names the submodule
    assert {"jaxreshard.formats.storage", "jaxreshard.formats.manifest"} <= g["jaxreshard.formats.mindspore_ckpt_write"]
    assert "jaxreshard.formats.adapter_config" in g["jaxreshard.lora"]


def test_no_import_cycle():
    g = graph(runtime=True)
    g.pop("jaxreshard")  # the public surface imports everything and is imported by nothing inside
    try:
        graphlib.TopologicalSorter(g).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_formats_are_the_ground_floor():
    bad = {(m, d) for m, deps in graph().items() if m.startswith("jaxreshard.formats")
           for d in deps if not d.startswith("jaxreshard.formats") and d not in FORMATS_MAY_IMPORT}
    assert sorted(bad) == []


def test_storage_is_under_every_format():
    """The byte-range seam imports nothing of the package (an object store plugs in below every format), and the
    formats that write rank files reach bytes only through it."""
    g = graph()
    assert g["jaxreshard.formats.storage"] == set()
    for writer in ("safetensors_write", "mindspore_ckpt_write", "base"):
        assert "jaxreshard.formats.storage" in g[f"jaxreshard.formats.{writer}"]


def test_leaves_stay_leaves():
    g = graph()
    assert {m: sorted(g[m] - FORMATS_MAY_IMPORT) for m in FORMATS_MAY_IMPORT} == {m: [] for m in FORMATS_MAY_IMPORT}


def test_mindformers_shims_are_on_top():
    bad = {(m, d) for m, deps in graph().items() if not m.startswith("jaxreshard.mindformers") and m not in SHIM_USERS
           for d in deps if d.startswith("jaxreshard.mindformers")}
    assert sorted(bad) == []


def test_the_mindspore_wing_is_above_the_plan():
    """The wing builds on the plan; nothing the plan or executor is made of imports the wing."""
    below = {"jaxreshard.box", "jaxreshard.coverage", "jaxreshard.layout", "jaxreshard.plan", "jaxreshard.fill",
             "jaxreshard.execute", "jaxreshard.fsutil", "jaxreshard.run"}
    g = graph()
    assert sorted((m, d) for m in below for d in g[m] if d.startswith("jaxreshard.mindspore")) == []


def lazy_imports(path: Path) -> list[int]:
    """Lines of package imports inside a function or class body (not at module level nor under a module-level
    `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body} | type_only_nodes(tree)
    ours = [n for n in ast.walk(tree) if id(n) not in top and (
        (isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").split(".")[0] == "jaxreshard"))
        or (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "jaxreshard" for a in n.names)))]
    return [n.lineno for n in ours]


def test_lazy_imports_are_found(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nfrom . import a\nif TYPE_CHECKING:\n    from .b import B\n"
                   "def f():\n    import jax\n    from .c import C\n    import jaxreshard.d\n")
    assert lazy_imports(src) == [7, 8]


def test_package_imports_at_the_top():
    """The graph is visible at the top of each module (jax and orbax may stay lazy: they are not ours)."""
    found = {m: lazy_imports(p) for m, p in modules().items()}
    assert {m: lines for m, lines in found.items() if lines} == {}


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    return next(n for n, names in LAYERS.items() if top in names)


def test_every_module_has_a_layer():
    tops = {m.split(".")[1] for m in modules() if m != "jaxreshard"}
    assert sorted(tops - set().union(*LAYERS.values())) == []
    assert sorted(set().union(*LAYERS.values()) - tops) == []


def test_imports_go_downward():
    g = graph()
    g.pop("jaxreshard")  # the public surface re-exports from every layer
    up = [(m, d) for m, deps in g.items() for d in deps if layer_of(d) < layer_of(m)]
    assert sorted(up) == []
