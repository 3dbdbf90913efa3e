"""Lineage: what produced a checkpoint or a metrics file.

``lineage.json`` beside each checkpoint and metrics file records the git commits of the project
directory (params.yaml, dvc.yaml, dvc.lock) and of the attnrl code, each with whether tracked files
had uncommitted changes, an MD5 of the code itself (``code_md5``: uncommitted edits count), the MD5
of every input file, which is the name DVC 3 gives that file in its cache and in ``dvc.lock``, and
the full resolved config. A number in a report can so be traced to the exact code, data and
parameters behind it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from attnrl.config.schema import RunConfig
from attnrl.utils.atomic import atomic_path

LINEAGE_FILE = "lineage.json"
# The pipeline's packages next to attnrl in a checkout (dvc.yaml lists them as the train stage's code).
CODE_PACKAGES = ("infra", "tasks", "flows")
_CHUNK = 1 << 20


def file_md5(path: Path) -> str:
    """MD5 of the bytes: DVC 3's hash of a file (its cache object is ``files/md5/<2>/<30>``)."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def input_hashes(paths: list[Path], root: Path) -> dict[str, str]:
    """MD5 of every file under ``paths`` (files or directories), keyed by path relative to ``root``."""
    hashes: dict[str, str] = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                hashes[_relative(file, root)] = file_md5(file)
    return hashes


def git_state(directory: Path) -> dict[str, Any]:
    """The commit checked out in ``directory`` and whether tracked files differ from it (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if commit is None or dirty is None else bool(dirty)}


def code_md5(package: Path = Path(__file__).resolve().parent) -> str:
    """MD5 over the relative path and bytes of every Python file of the attnrl package (``package``) and
    of the pipeline's own packages beside it (``CODE_PACKAGES``): equal digests, the same code,
    committed or not."""
    digest = hashlib.md5()
    for directory in [package, *(package.parent / name for name in CODE_PACKAGES)]:
        for file in sorted(directory.rglob("*.py")) if directory.is_dir() else []:
            digest.update(str(file.relative_to(package.parent)).encode() + b"\0")
            digest.update(hashlib.md5(file.read_bytes()).digest())
    return digest.hexdigest()


def lineage(config: RunConfig, inputs: list[Path], root: str | Path = ".") -> dict[str, Any]:
    root = Path(root).resolve()
    return {
        "git": {"project": git_state(root), "code": git_state(Path(__file__).resolve().parent)},
        "code_md5": code_md5(),
        "inputs_md5": input_hashes([Path(p).resolve() for p in inputs], root),
        "config": config.model_dump(mode="json"),
    }


def write_lineage(directory: Path, record: dict[str, Any]) -> Path:
    target = Path(directory) / LINEAGE_FILE
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    return target


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path.resolve())
