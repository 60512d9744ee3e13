"""``structvit.ops`` is layered downwards: backends <- autotune <- dispatch <- functional.

A module may import the layers below it, never one above (that would make the
dependencies circular, broken today by function-local imports). The check reads the
import statements of every ops module, including those inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import structvit.ops

OPS = Path(structvit.ops.__file__).parent

# the ops modules above each layer: none of them may be imported from that layer
LAYERS = [
    ("backends", {"autotune", "dispatch", "functional"}),
    ("native", {"backends", "autotune", "dispatch", "functional"}),
    ("autotune", {"dispatch", "functional"}),
    ("dispatch", {"functional"}),
]


def _ops_imports(source: str, package: tuple[str, ...]) -> set[str]:
    """The ops-level modules ``source`` (a module of ``package``, e.g. ("structvit", "ops",
    "backends")) imports: relative imports resolved, the first component under ops."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            names = [module + [alias.name] for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        else:
            continue
        for parts in names:
            if parts[:2] == ["structvit", "ops"] and len(parts) > 2:
                found.add(parts[2])
    return found


def test_ops_modules_import_only_downwards():
    problems = []
    for layer, above in LAYERS:
        paths = sorted((OPS / layer).glob("*.py")) if (OPS / layer).is_dir() else [OPS / f"{layer}.py"]
        assert paths, layer
        for path in paths:
            package = ("structvit", "ops") + (() if path.parent == OPS else (path.parent.name,))
            bad = _ops_imports(path.read_text(), package) & above
            if bad:
                problems.append(f"{path.relative_to(OPS)} imports {sorted(bad)}")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_relative_and_function_local_imports():
    source = ("import torch\nfrom .common import normalise\n"
              "def f():\n    from ..dispatch import choose_backend\n    from .. import autotune\n"
              "    import structvit.ops.functional\n")
    assert _ops_imports(source, ("structvit", "ops", "backends")) == {"backends", "dispatch", "autotune",
                                                                        "functional"}
