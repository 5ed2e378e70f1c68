"""The package's layers point down, read from the source's imports (every one, also those inside
functions; not those under `if TYPE_CHECKING:`, which never run):

    cli → server, batch → client → worker → records → queue → security, templates, webhooks → storage → workflow → nano
    → engine → base

A module imports from its own package, from the layers below it, and from the base modules (the
package's top-level modules: errors, identity, limits, settings ...), which import only each other.
Packages on one layer do not import each other, and no two modules import each other (a package and its
own modules aside: importing `package.module` runs the package's `__init__`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import zimage_serve

PACKAGE = Path(zimage_serve.__file__).parent
LAYERS = (
    ("cli",),
    ("server", "batch"),
    ("client",),
    ("worker",),
    ("records",),
    ("queue",),
    ("security", "templates", "webhooks"),
    ("storage",),
    ("workflow", "workflows"),
    ("nano",),
    ("engine",),
)
BASE = len(LAYERS)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> tuple[int, str]:
    """(depth, unit): the unit is the package (or, for a base module, the module itself)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    top = "cli" if top == "__main__" else top  # `python -m zimage_serve` is the command line
    depth = next((i for i, names in enumerate(LAYERS) if top in names), BASE)
    return depth, top


def imports(module: str, path: Path) -> set[str]:
    """The package's modules `module` imports, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for child in node.body
        for inner in ast.walk(child)
    }
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return {name for name in found if name == "zimage_serve" or name.startswith("zimage_serve.")}


def test_every_import_points_down_and_no_two_modules_import_each_other() -> None:
    known = modules()
    graph = {
        module: {name for name in imports(module, path) if name in known} - {module} for module, path in known.items()
    }
    upward = []
    for module, names in graph.items():
        depth, unit = layer(module)
        for name in names:
            other_depth, other_unit = layer(name)
            if other_unit == unit or name == "zimage_serve":
                continue
            if other_depth < depth or (other_depth == depth and depth != BASE):
                upward.append(f"{module} imports {name}")
    assert upward == [], "imports that run against the layers:\n" + "\n".join(sorted(upward))
    mutual = sorted(
        {
            " and ".join(sorted((a, b)))
            for a in graph
            for b in graph[a]
            if a in graph.get(b, ()) and not (a.startswith(b + ".") or b.startswith(a + "."))  # a package's own
        }
    )
    assert mutual == [], "modules that import each other:\n" + "\n".join(mutual)


def test_the_checker_sees_an_upward_import_and_a_pair(tmp_path: Path) -> None:
    """The checker itself: a lazy import inside a function counts; one under TYPE_CHECKING does not."""
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from zimage_serve.server import app\n"
        "def f():\n    from zimage_serve.queue import sqlite_queue\n",
        encoding="utf-8",
    )
    assert imports("zimage_serve.engine.m", module) == {"zimage_serve.queue", "zimage_serve.queue.sqlite_queue"}
    assert layer("zimage_serve.engine.parts") > layer("zimage_serve.queue.sqlite_queue")
    assert layer("zimage_serve.errors")[0] == BASE
