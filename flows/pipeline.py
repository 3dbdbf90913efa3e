"""The ``pipeline`` flow: every stage as a subflow, in order, with a check between stages.

prepare → warmup → (difficulty) → evaluate the warmed-up policy (``runs/eval-init``) → train →
evaluate the trained policy (``runs/eval``) → report. Each stage flow runs its own data check (the
Great Expectations gates of :mod:`tasks.checks`); the pipeline adds read-back checks of the model
directories, the training metrics and the report. A failed check raises and the next stage never
starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, get_run_logger

from attnrl.stages.evaluate import EvaluationResult
from attnrl.stages.layout import Layout
from attnrl.stages.report import ReportResult
from attnrl.stages.train import TrainResult
from flows.stages import (
    DEFAULT_CONFIG,
    difficulty_flow,
    evaluate_flow,
    load_flow_config,
    prepare_flow,
    report_flow,
    train_flow,
    warmup_flow,
)
from tasks.checks import (
    check_model_dir_task,
    check_report_task,
    check_train_metrics_task,
)


@dataclass(frozen=True)
class PipelineResult:
    before: EvaluationResult  # the warmed-up policy
    after: EvaluationResult   # the trained policy
    train: TrainResult
    report: ReportResult


@flow(name="pipeline", log_prints=True)
def pipeline(config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None, root: str = ".",
             method: str | None = None) -> PipelineResult:
    """Run every stage; returns the before/after evaluations, the training run and the report."""
    config = load_flow_config(config_path, overrides, method)  # fail fast, before any stage starts
    layout = Layout.of(config, root)
    logger = get_run_logger()
    common = {"config_path": config_path, "overrides": overrides, "root": root, "method": method}

    prepared = prepare_flow(**common)
    logger.info("prepared %d training problems, evaluation: %s", prepared.train_count, prepared.eval_counts)

    warmed = warmup_flow(**common)
    check_model_dir_task(warmed.model_dir)

    if config.difficulty.enabled:
        difficulty_flow(**common)

    before = evaluate_flow(**common, out_dir=str(layout.runs_dir / "eval-init"))

    trained = train_flow(**common)
    check_model_dir_task(trained.final_model)
    # A token budget (train.max_generated_tokens) may end training before train.steps.
    budgeted = config.train.max_generated_tokens is not None
    check_train_metrics_task(trained.metrics_path, None if budgeted else config.train.steps)

    after = evaluate_flow(**common, model_dir=str(trained.final_model))

    report = report_flow(**common)
    check_report_task(report.html_path)
    return PipelineResult(before=before, after=after, train=trained, report=report)
