"""The ``pipeline`` flow: every stage as a subflow, in order, with a check between stages.

prepare → warmup → (difficulty) → evaluate the warmed-up policy (``runs/eval-init``) → train →
evaluate the trained policy (``runs/eval``) → report. Each stage flow runs its own data check (the
Great Expectations gates of :mod:`tasks.checks`); the pipeline adds read-back checks of the model
directories, the training metrics and the report. A failed check raises and the next stage never
starts.

In a DVC project (``.dvc/`` and ``dvc.yaml`` in ``root``) run with its own ``params.yaml`` and no
overrides, each stage's outputs are recorded with ``dvc commit`` right after the stage and its checks
passed, and pushed when a default remote is set (:mod:`tasks.versioning`): afterwards ``dvc status``
is clean and ``dvc repro`` has nothing to do. A stage that fails its check is never recorded, so the
previous versioned outputs stay in the cache and ``dvc.lock``.
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
from infra import dvc_store
from tasks.checks import (
    check_model_dir_task,
    check_report_task,
    check_train_metrics_task,
)
from tasks.versioning import record, versioned_stages


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
    stages = versioned_stages(root, config_path, overrides, method)
    remote = dvc_store.default_remote(root) if stages else None

    prepared = prepare_flow(**common)
    logger.info("prepared %d training problems, evaluation: %s", prepared.train_count, prepared.eval_counts)
    record(root, "prepare", stages, remote)

    warmed = warmup_flow(**common)
    check_model_dir_task(warmed.model_dir)
    record(root, "warmup", stages, remote)

    if config.difficulty.enabled:
        difficulty_flow(**common)
        record(root, "difficulty", stages, remote)

    before = evaluate_flow(**common, out_dir=str(layout.runs_dir / "eval-init"))
    record(root, "evaluate_init", stages, remote)

    trained = train_flow(**common)
    check_model_dir_task(trained.final_model)
    # A token budget (train.max_generated_tokens) may end training before train.steps.
    budgeted = config.train.max_generated_tokens is not None
    check_train_metrics_task(trained.metrics_path, None if budgeted else config.train.steps)
    record(root, "train", stages, remote)

    after = evaluate_flow(**common, model_dir=str(trained.final_model))
    record(root, "evaluate", stages, remote)

    report = report_flow(**common)
    check_report_task(report.html_path)
    record(root, "report", stages, remote)
    return PipelineResult(before=before, after=after, train=trained, report=report)
