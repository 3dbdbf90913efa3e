"""Prefect tasks that record each pipeline stage with DVC (``infra/dvc_store.py``).

The pipeline records a stage only when ``dvc.lock`` can describe the run truthfully: the root is a
DVC project and the run read that project's ``params.yaml`` with no overrides and no method preset.
Pushing retries (the remote may be briefly unreachable); committing does not (it is local and
deterministic).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from infra import dvc_store
from tasks.retry import RETRIES, RETRY_DELAY_SECONDS


def versioned_stages(root: str | Path, config_path: str, overrides: list[str] | None, method: str | None) -> set[str]:
    """The dvc.yaml stage names the pipeline records after running them (empty: no recording)."""
    root = Path(root)
    if not dvc_store.is_dvc_project(root):
        return set()
    if overrides or method or Path(config_path).resolve() != (root / "params.yaml").resolve():
        get_run_logger().warning(
            "not recording stages with DVC: this run did not read %s unmodified (overrides %s, method %s, config %s), "
            "so dvc.lock would not describe it", root / "params.yaml", overrides, method, config_path)
        return set()
    return set(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


@task(name="dvc commit", cache_policy=NO_CACHE, persist_result=False)
def record_stage_task(root: str | Path, stage: str) -> None:
    dvc_store.record_stage(root, stage)


@task(name="dvc push", cache_policy=NO_CACHE, persist_result=False, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_SECONDS)
def push_stage_task(root: str | Path, stage: str) -> None:
    dvc_store.push_stage(root, stage)


def record(root: str | Path, stage: str, stages: set[str], remote: str | None) -> None:
    """Commit ``stage`` (and push it when the project has a default remote) if the pipeline records it."""
    if stage in stages:
        record_stage_task(root, stage)
        if remote:
            push_stage_task(root, stage)
