"""The pure core ``attnrl`` never imports the orchestration layer or a heavy backend (architecture.md),
not even lazily: those are reached through registries' import paths ("infra.deepspeed_backend:…")."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import PROJECT_ROOT

# Orchestration (flows, tasks, Prefect, Ray, DVC, GX), the infra layer, and the engines and trainers
# that need their own environment or hardware (vLLM, DeepSpeed).
FORBIDDEN = {"prefect", "flows", "tasks", "ray", "dvc", "great_expectations", "infra", "vllm", "deepspeed"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_module_of_the_core_imports_the_orchestration_layer_or_a_backend():
    offenders = {
        str(path.relative_to(PROJECT_ROOT)): sorted(_imported_roots(path) & FORBIDDEN)
        for path in sorted((PROJECT_ROOT / "attnrl").rglob("*.py"))
        if _imported_roots(path) & FORBIDDEN
    }
    assert offenders == {}

