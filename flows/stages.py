"""One Prefect flow per stage. Each resolves the typed config itself (a bad key or value fails the flow
at once, naming the field, before any task runs), or takes it resolved as ``config`` (the pipeline
passes its run's one resolution to every stage, so an edit of ``params.yaml`` during the run changes
none of them, and the UI shows each stage's configuration among its parameters), and calls that
stage's task, which calls the one stage function in ``attnrl.stages`` with the stage's data check
(``tasks/checks.py``; skipped with ``checks.enabled=false``): a bad output fails the flow before it
replaces the previous output, so nothing downstream consumes it.

Every flow takes the same parameters as the CLI: ``config_path`` (``--config``), ``overrides``
(``--set key.path=value``), ``root`` (``--root``) and ``method`` (``--method``). A run holds its root's
workspace lock, and a run with overrides in a DVC project writes to its own root (:mod:`flows.workspace`).

Loading this module reads the flows' definitions only: each flow imports its stage's task (``tasks.stages``:
torch, transformers, Great Expectations) when it runs, before it takes the workspace lock. Prefect loads
a deployment's flow in a fresh process only to look for its cancellation hooks before it marks a
cancelled run Cancelled; with the stages' code imported here that took 11 s on 2 cores. The command
line and the pipeline import them before their run starts (:func:`import_stage_code`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

from prefect import Task, flow

from attnrl.config import resolve_config
from attnrl.config.schema import RunConfig
from attnrl.errors import ConfigError
from attnrl.stages.layout import CHECKPOINTS_DIR, Layout
from attnrl.stages.results import (
    DifficultyResult,
    EvaluationResult,
    PreparedData,
    ReportResult,
    TrainResult,
    WarmupResult,
)
from flows.console import attnrl_logs_in_runs
from flows.stopping import signals_recorded, stage_running
from flows.workspace import run_workspace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub at run time
attnrl_logs_in_runs()

DEFAULT_CONFIG = "params.yaml"
P = ParamSpec("P")
R = TypeVar("R")


def load_flow_config(config_path: str, overrides: list[str] | None, method: str | None,
                     config: RunConfig | None = None) -> RunConfig:
    """Resolve the config inside the flow run, so a bad config is that run's failure (no retries);
    ``config``, already resolved, is used as it is."""
    if config is None:
        return resolve_config(path=config_path, method=method, overrides=overrides or [])
    if overrides or method:
        raise ConfigError(f"a stage given a resolved config takes no overrides ({overrides}) or method ({method}): "
                          "apply them where the config is resolved")
    return config


@contextmanager
def stage_workspace(name: str, config: RunConfig, root: str, config_path: str, overrides: list[str] | None,
                    method: str | None, produces: set[str]) -> Iterator[Path]:
    """Stage ``name``'s root under its workspace lock (:func:`flows.workspace.run_workspace`), with every stop
    signal recorded and the stage noted for the line a stopped command prints (:mod:`flows.stopping`)."""
    with signals_recorded(), run_workspace(root, config, config_path, overrides, method, produces) as own:
        checkpoints = Layout.of(config, own).train_dir / CHECKPOINTS_DIR if name == "train" else None
        with stage_running(name, checkpoints):
            yield own


def import_stage_code() -> None:
    """Import every stage's task and check (``tasks.stages``, ``tasks.checks``) now, so that a run does not
    spend its first seconds importing them with its workspace lock held or while it waits for it."""
    for module in ("tasks.checks", "tasks.stages"):
        importlib.import_module(module)


def bounded(stage_task: Task[P, R], seconds: float | None) -> Task[P, R]:
    """``stage_task`` with its run bounded by ``seconds`` (``timeouts.*``; None: unbounded)."""
    return stage_task.with_options(timeout_seconds=seconds)


@flow(name="prepare", log_prints=True)
def prepare_flow(config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, root: str = ".",
                 method: str | None = None, config: RunConfig | None = None) -> PreparedData:
    from tasks.stages import prepare_task

    config = load_flow_config(config_path, overrides, method, config)
    with stage_workspace("prepare", config, root, config_path, overrides, method, {"prepare"}) as own:
        return bounded(prepare_task, config.timeouts.prepare_s)(config, own)


@flow(name="warmup", log_prints=True)
def warmup_flow(config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, root: str = ".",
                method: str | None = None, config: RunConfig | None = None) -> WarmupResult:
    from tasks.stages import warmup_task

    config = load_flow_config(config_path, overrides, method, config)
    with stage_workspace("warmup", config, root, config_path, overrides, method, {"warmup"}) as own:
        return bounded(warmup_task, config.timeouts.warmup_s)(config, own)


@flow(name="difficulty", log_prints=True)
def difficulty_flow(config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, root: str = ".",
                    method: str | None = None, config: RunConfig | None = None) -> DifficultyResult:
    from tasks.stages import difficulty_task

    config = load_flow_config(config_path, overrides, method, config)
    with stage_workspace("difficulty", config, root, config_path, overrides, method, {"difficulty"}) as own:
        return bounded(difficulty_task, config.timeouts.difficulty_s)(config, own)


@flow(name="train", log_prints=True)
def train_flow(config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, root: str = ".",
               method: str | None = None, config: RunConfig | None = None) -> TrainResult:
    """RL training; with checks on, the input problems are gated first and every step's rollout batch
    before its update."""
    from tasks.checks import gate_training_input_task
    from tasks.stages import train_task

    config = load_flow_config(config_path, overrides, method, config)
    with stage_workspace("train", config, root, config_path, overrides, method, set()) as own:
        if config.checks.enabled:
            gate_training_input_task(config, own)
        return bounded(train_task, config.timeouts.train_s)(config, own)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, root: str = ".",
                  method: str | None = None, model_dir: str | None = None,
                  out_dir: str | None = None, config: RunConfig | None = None) -> EvaluationResult:
    """Evaluate ``model_dir`` (default: the initial policy) into ``out_dir`` (default: ``runs/eval``)."""
    from tasks.stages import evaluate_task

    config = load_flow_config(config_path, overrides, method, config)
    with stage_workspace("evaluate", config, root, config_path, overrides, method, set()) as own:
        return bounded(evaluate_task, config.timeouts.evaluate_s)(config, own, model_dir, out_dir)


@flow(name="report", log_prints=True)
def report_flow(config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, root: str = ".",
                method: str | None = None, config: RunConfig | None = None) -> ReportResult:
    from tasks.stages import report_task

    config = load_flow_config(config_path, overrides, method, config)
    with stage_workspace("report", config, root, config_path, overrides, method, set()) as own:
        return bounded(report_task, config.timeouts.report_s)(config, own)
