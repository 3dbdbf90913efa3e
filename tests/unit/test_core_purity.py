"""The pure core ``attnrl`` never imports the orchestration layer (architecture.md), not even lazily."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import PROJECT_ROOT

FORBIDDEN = {"prefect", "flows", "tasks", "ray"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_module_of_the_core_imports_prefect_anywhere():
    offenders = {
        str(path.relative_to(PROJECT_ROOT)): sorted(_imported_roots(path) & FORBIDDEN)
        for path in sorted((PROJECT_ROOT / "attnrl").rglob("*.py"))
        if _imported_roots(path) & FORBIDDEN
    }
    assert offenders == {}

