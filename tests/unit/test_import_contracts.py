"""The layers' import rules hold (pyproject.toml ``[tool.importlinter]``, docs/architecture.md): the core imports
neither infra, tasks, flows nor a heavy system, even lazily, and flows > tasks > infra > core."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROJECT_ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # ahead of the editable install's finder
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_import_contracts_are_kept():
    done = _lint(PROJECT_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_a_core_module_importing_infra_breaks_them(tmp_path):
    for package in ("attnrl", "infra", "tasks", "flows"):
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "attnrl" / "fci.py").open("a") as f:
        f.write("\n\ndef _lazy():\n    import infra.placement  # noqa: F401\n")
    done = _lint(tmp_path)
    assert done.returncode == 1, done.stdout
    assert "attnrl is not allowed to import infra" in done.stdout
    assert "attnrl.fci -> infra.placement" in done.stdout
