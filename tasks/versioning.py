"""Prefect tasks that record each pipeline stage with DVC (``infra/dvc_store.py``).

The pipeline records a stage only when ``dvc.lock`` can describe the run truthfully
(``StageRecorder``), and a run given an experiment name (the nightly deployment) as a DVC experiment,
pushed with its outputs. A default remote can come from the environment (``dvc_store.remote_from_env``). Pushing retries (the remote may be briefly unreachable); committing does not
(it is local and deterministic).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from attnrl.config import RunConfig, resolve_config
from attnrl.config.identity import changed_keys, config_digest
from attnrl.errors import ConfigError
from infra import dvc_store
from tasks.retry import RETRIES, RETRY_DELAY_SECONDS

GIT_REMOTE = "origin"  # where experiments go: the project's own git remote


class StageRecorder:
    """Records a pipeline run's stages with DVC, each right after it passed its checks.

    Only when ``dvc.lock`` can describe the run truthfully: the root is a DVC project, the run read
    that project's ``params.yaml`` with no overrides and no method preset, and the file still
    resolves to the run's configuration when the stage is recorded. After an edit during the run
    the stage and every later one are left unrecorded, with a warning naming the changed keys: the
    run goes on with its own configuration, and ``dvc repro`` or another run records the new one.
    """

    def __init__(self, root: str | Path, config: RunConfig, stages: set[str], remote: str | None) -> None:
        self.root, self.config, self.stages, self.remote = Path(root), config, stages, remote

    @classmethod
    def for_run(cls, root: str | Path, config: RunConfig, config_path: str, overrides: list[str] | None,
                method: str | None) -> StageRecorder:
        root = Path(root)
        if not dvc_store.is_dvc_project(root):
            return cls(root, config, set(), None)
        if not reads_versioned_params(root, config_path, overrides, method):
            get_run_logger().warning(
                "not recording stages with DVC: this run did not read %s unmodified (overrides %s, method %s, "
                "config %s), so dvc.lock would not describe it", root / "params.yaml", overrides, method, config_path)
            return cls(root, config, set(), None)
        stages = set(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
        return cls(root, config, stages, dvc_store.remote_from_env(root) or dvc_store.default_remote(root))

    def record(self, stage: str) -> None:
        """Commit ``stage`` (and push it when the project has a default remote) if this run records it."""
        if stage not in self.stages:
            return
        edit = _params_edit(self.root, self.config)
        if edit:
            get_run_logger().warning(
                "not recording %s or any later stage with DVC: %s changed during this run (%s), so dvc.lock "
                "would record parameters this run did not use; this run keeps its configuration (sha256 %s)",
                stage, self.root / "params.yaml", edit, config_digest(self.config)[:12])
            self.stages = set()
            return
        record_stage_task(self.root, stage)
        if self.remote:
            push_stage_task(self.root, stage)


    def record_experiment(self, name: str) -> None:
        """Save the recorded run as DVC experiment ``name`` and push it (its git ref to ``origin``, its
        outputs to the default remote), so a fresh clone can ``dvc exp pull origin <name>`` it."""
        logger = get_run_logger()
        if not self.stages:
            logger.warning("not recording experiment %s: this run's stages were not recorded with DVC", name)
            return
        save_experiment_task(self.root, name)
        if not dvc_store.git_remote(self.root, GIT_REMOTE):
            logger.warning("experiment %s saved but not pushed: the project has no git remote %r", name, GIT_REMOTE)
        elif not self.remote:
            logger.warning("experiment %s saved but not pushed: the project has no default DVC remote (set $%s)",
                           name, dvc_store.REMOTE_URL_ENV)
        else:
            push_experiment_task(self.root, name)


def reads_versioned_params(root: str | Path, config_path: str, overrides: list[str] | None,
                           method: str | None) -> bool:
    """Whether a run reads ``root/params.yaml`` as it is: the configuration ``dvc.lock`` describes."""
    return not overrides and not method and Path(config_path).resolve() == (Path(root) / "params.yaml").resolve()


@task(name="dvc exp save", cache_policy=NO_CACHE, persist_result=False)
def save_experiment_task(root: Path, name: str) -> None:
    dvc_store.save_experiment(root, name)


@task(name="dvc exp push", cache_policy=NO_CACHE, persist_result=False, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_SECONDS)
def push_experiment_task(root: Path, name: str) -> None:
    dvc_store.push_experiment(root, name, GIT_REMOTE)


@task(name="dvc commit", cache_policy=NO_CACHE, persist_result=False)
def record_stage_task(root: str | Path, stage: str) -> None:
    dvc_store.record_stage(root, stage)


@task(name="dvc push", cache_policy=NO_CACHE, persist_result=False, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_SECONDS)
def push_stage_task(root: str | Path, stage: str) -> None:
    dvc_store.push_stage(root, stage)


def _params_edit(root: Path, config: RunConfig) -> str:
    """How ``root/params.yaml`` now differs from ``config`` ('' when it resolves to it)."""
    try:
        return ", ".join(changed_keys(config, resolve_config(path=root / "params.yaml")))
    except ConfigError as exc:
        return f"it no longer resolves: {exc}"
