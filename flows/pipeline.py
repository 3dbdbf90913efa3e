"""The ``pipeline`` flow: every stage as a subflow, in order, with a check between stages.

prepare → warmup → difficulty (a pass-through unless ``difficulty.enabled``) → evaluate the
warmed-up policy (``runs/eval-init``) → train → evaluate the trained policy (``runs/eval``) →
report. Each stage flow runs its own data check (the Great Expectations gates of
:mod:`tasks.checks`); the pipeline adds read-back checks of the model directories, the training
metrics and the report. A failed check raises and the next stage never starts.

The configuration is resolved once, when the run starts (a retry of the run gets the same one), and
passed to every stage: editing ``params.yaml`` during a run changes nothing in it. Each stage (its
subflow, its checks and its DVC record) is one cached ``stage`` task run (:mod:`tasks.finished_stages`):
a retry of the run skips, with a log line, every stage an earlier attempt completed whose outputs are
unchanged, and continues with the one that failed.

In a DVC project (``.dvc/`` and ``dvc.yaml`` in ``root``) run with its own ``params.yaml`` and no
overrides, each stage's outputs are recorded with ``dvc commit`` right after the stage and its checks
passed, and pushed when a default remote is set (:mod:`tasks.versioning`): afterwards ``dvc status``
is clean and ``dvc repro`` has nothing to do. A stage that fails its check is never recorded, so the
previous versioned outputs stay in the cache and ``dvc.lock``; nor is a stage recorded once
``params.yaml`` no longer resolves to the run's configuration (``tasks.versioning.StageRecorder``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from prefect import flow, get_run_logger, task
from prefect.cache_policies import RUN_ID
from prefect.runtime import flow_run

from attnrl.config.identity import config_digest
from attnrl.config.schema import RunConfig
from attnrl.stages.layout import Layout
from attnrl.stages.results import EvaluationResult, ReportResult, TrainResult, WarmupResult
from attnrl.utils.progress import duration
from flows.console import headline
from flows.stages import (
    DEFAULT_CONFIG,
    difficulty_flow,
    evaluate_flow,
    import_stage_code,
    load_flow_config,
    prepare_flow,
    report_flow,
    train_flow,
    warmup_flow,
)
from flows.stopping import signals_recorded
from flows.workspace import run_workspace
from tasks.finished_stages import run_stage
from tasks.versioning import StageRecorder

T = TypeVar("T")


@dataclass(frozen=True)
class PipelineResult:
    before: EvaluationResult  # the warmed-up policy
    after: EvaluationResult   # the trained policy
    train: TrainResult
    report: ReportResult


@task(name="resolve config", cache_policy=RUN_ID, persist_result=True)
def run_config_task(config_path: str, overrides: list[str] | None, method: str | None) -> RunConfig:
    """The run's one configuration. Cached on the flow run's id, so a retry of the run (from the UI or
    the flow's own retries) uses the configuration its first attempt resolved, not today's file."""
    return load_flow_config(config_path, overrides, method)


@flow(name="pipeline", log_prints=True)
def pipeline(config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, root: str = ".",
             method: str | None = None, experiment: str | None = None) -> PipelineResult:
    """Run every stage; returns the before/after evaluations, the training run and the report. With
    ``experiment``, a recorded run is also saved as the DVC experiment ``<experiment>-<UTC start
    time>`` and pushed (the nightly deployment's record of each night)."""
    import_stage_code()  # before the workspace lock (flows/stages.py)
    config = run_config_task(config_path, overrides, method)  # fail fast, before any stage starts
    get_run_logger().info("configuration %s%s%s (sha256 %s), used by every stage of this run", config_path,
                          f" with overrides {overrides}" if overrides else "",
                          f" and method {method}" if method else "", config_digest(config)[:12])
    recorder = StageRecorder.for_run(root, config, config_path, overrides, method)
    with signals_recorded(), \
            run_workspace(root, config, config_path, overrides, method, {"prepare", "warmup", "difficulty"}) as own:
        result = _run_stages(config, own, recorder)
        if experiment:
            recorder.record_experiment(f"{experiment}-{flow_run.get_scheduled_start_time():%Y%m%d-%H%M%S}")
        return result


def _run_stages(config: RunConfig, root: Path, recorder: StageRecorder) -> PipelineResult:
    from tasks.checks import check_model_dir_task, check_report_task, check_train_metrics_task

    layout = Layout.of(config, root)
    logger = get_run_logger()
    common = {"config": config, "root": str(root)}
    digest = config_digest(config)

    def stage(name: str, outputs: list[Path], run: Callable[[], T]) -> T:
        """``run`` (the stage's subflow and checks), then its DVC record: skipped as one on a retry."""
        def run_and_record() -> T:
            logger.info("%s: started", name)
            started = time.perf_counter()
            result = run()
            recorder.record(name)
            logger.info("%s: done in %s: %s", name, duration(time.perf_counter() - started), headline(result))
            return result
        return run_stage(name, digest, outputs, run_and_record)

    def warmup() -> WarmupResult:
        warmed = warmup_flow(**common)
        check_model_dir_task(warmed.model_dir)
        return warmed

    def train() -> TrainResult:
        trained = train_flow(**common)
        check_model_dir_task(trained.final_model)
        # A token budget (train.max_generated_tokens) may end training before train.steps.
        budgeted = config.train.max_generated_tokens is not None
        check_train_metrics_task(trained.metrics_path, None if budgeted else config.train.steps)
        return trained

    def report() -> ReportResult:
        reported = report_flow(**common)
        check_report_task(reported.html_path)
        return reported

    eval_init = layout.runs_dir / "eval-init"
    stage("prepare", [layout.prepared_dir], lambda: prepare_flow(**common))
    stage("warmup", [layout.init_model], warmup)
    # with difficulty.enabled false it passes the problems through
    stage("difficulty", [layout.difficulty_dir], lambda: difficulty_flow(**common))
    before = stage("evaluate_init", [eval_init], lambda: evaluate_flow(**common, out_dir=str(eval_init)))
    trained = stage("train", [layout.train_dir], train)
    after = stage("evaluate", [layout.eval_dir],
                  lambda: evaluate_flow(**common, model_dir=str(trained.final_model)))
    reported = stage("report", [layout.reports_dir], report)
    return PipelineResult(before=before, after=after, train=trained, report=reported)
