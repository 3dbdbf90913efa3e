"""Prefect tasks around the stage functions of ``attnrl.stages``: retries and artifacts, no stage logic.

Each task calls exactly one stage function (one implementation per stage) and publishes what a person
wants to see in the UI: a per-stage summary (counts, paths), the evaluation table and the last training
steps. Generation- and I/O-heavy stages retry transient failures; deterministic ones (``ConfigError``,
``DataError``, ``ModelLoadError``) fail at once (:mod:`tasks.retry`). Training and evaluation metrics
are also logged with DVCLive (:mod:`infra.live_metrics`). The data checks of
:mod:`tasks.checks` run inside the stage tasks, as nested task runs, on the stage's new output
before it replaces the previous one, and on every training step's batch before its update.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from attnrl.config.schema import RunConfig
from attnrl.eval.metrics import summarise
from attnrl.stages.difficulty import DifficultyResult, estimate_difficulty
from attnrl.stages.evaluate import EvaluationResult, evaluate
from attnrl.stages.layout import Layout
from attnrl.stages.prepare import PreparedData, prepare
from attnrl.stages.report import ReportResult, build_report
from attnrl.stages.train import TrainResult, train
from attnrl.stages.warmup import WarmupResult, warmup
from infra.live_metrics import LiveTrainMetrics, write_eval_metrics
from tasks.checks import gate_difficulty_task, gate_evaluation_task, gate_prepared_task, rollout_batch_gate
from tasks.retry import RETRIES, RETRY_DELAY_SECONDS, retry_unless_deterministic

# Stages write files: never skip one because an earlier run had the same inputs.
_COMMON: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
_RETRYING: dict[str, Any] = {
    **_COMMON,
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAY_SECONDS,
    "retry_condition_fn": retry_unless_deterministic,
}
TRAIN_METRIC_COLUMNS = (
    "step", "reward", "mc_reward", "entropy", "valid_token_ratio", "prompt_batch_size",
    "train_sequences", "generated_tokens", "step_time_s",
)
LAST_STEPS = 10
T = TypeVar("T")


def _summary(stage: str, rows: list[tuple[str, Any]]) -> None:
    lines = [f"# {stage}", "", "| item | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    create_markdown_artifact(markdown="\n".join(lines), key=f"{stage}-summary", description=f"attnrl {stage} stage")


@task(name="prepare", **_COMMON)
def prepare_task(config: RunConfig, root: str | Path = ".") -> PreparedData:
    result = prepare(config, root, check=_gate(config, lambda tmp: gate_prepared_task(config, root, tmp)))
    rows = [("training problems", result.train_count), ("training file", result.train_path),
            ("dropped (prompt too long)", result.dropped_overlong)]
    rows += [(f"eval {name}", f"{result.eval_counts[name]} problems → {path}")
             for name, path in result.eval_paths.items()]
    _summary("prepare", rows)
    return result


@task(name="warmup", **_RETRYING)
def warmup_task(config: RunConfig, root: str | Path = ".") -> WarmupResult:
    result = warmup(config, root)
    rows: list[tuple[str, Any]] = [("initial policy", result.model_dir), ("SFT steps", len(result.history))]
    if result.history:
        rows.append(("final loss", f"{result.history[-1].get('loss', float('nan')):.4f}"))
    _summary("warmup", rows)
    return result


@task(name="difficulty", **_RETRYING)
def difficulty_task(config: RunConfig, root: str | Path = ".") -> DifficultyResult:
    result = estimate_difficulty(config, root,
                                 check=_gate(config, lambda tmp: gate_difficulty_task(config, root, tmp)))
    _summary("difficulty", [
        ("problems estimated", result.estimated), ("problems kept", result.kept),
        ("ADS easy mean", f"{result.easy_mean.mean:.4f} over {result.easy_mean.count}"),
        ("difficulty table", result.table_path), ("kept problems", result.train_path),
    ])
    return result


@task(name="train-phase", task_run_name="{name}", **_COMMON)
def train_phase(name: str, fn: Callable[[], T]) -> T:
    """One training step (``step-N``) or a phase inside it (``generate``, ``score``, ``update``): a task
    run each, nested, so the UI shows where every step's time goes. No retries of their own: the
    train task's retry resumes from the newest checkpoint."""
    return fn()


@task(name="train", **_RETRYING)
def train_task(config: RunConfig, root: str | Path = ".") -> TrainResult:
    """RL training, each step and phase a nested task run; a retry resumes from the newest checkpoint."""
    check_batch = rollout_batch_gate(config, root) if config.checks.enabled else None
    live = LiveTrainMetrics(Layout.of(config, root).train_dir)
    result = train(config, root, on_metrics=live, phases=train_phase, check_batch=check_batch)
    live.sync(result.metrics)  # a run that trained no step (resumed a finished one) still leaves its log
    last = result.metrics[-LAST_STEPS:]
    if last:
        columns = [c for c in TRAIN_METRIC_COLUMNS if any(c in row for row in last)]
        create_table_artifact(table=[{c: row.get(c) for c in columns} for row in last], key="train-last-steps",
                              description=f"attnrl train: the last {len(last)} steps' metrics")
    _summary("train", [("steps", len(result.metrics)), ("final policy", result.final_model),
                       ("metrics", result.metrics_path), ("resumed from", result.resumed_from or "-")])
    return result


@task(name="evaluate", **_RETRYING)
def evaluate_task(config: RunConfig, root: str | Path = ".", model_dir: str | Path | None = None,
                  out_dir: str | Path | None = None) -> EvaluationResult:
    name = Path(out_dir) if out_dir is not None else Layout.of(config, root).eval_dir
    check = _gate(config, lambda tmp: gate_evaluation_task(config, root, tmp, name))
    result = evaluate(config, root, model_dir=model_dir, out_dir=out_dir, check=check)
    write_eval_metrics(result.metrics_path.parent, summarise(result.scores))
    table: list[dict[str, Any]] = [
        {"benchmark": s.benchmark, "problems": s.problems, "k": s.k,
         "mean@k": round(s.mean_at_k, 4), "pass@k": round(s.pass_at_k, 4)}
        for s in result.scores
    ]
    if result.scores:
        table.append({"benchmark": "average", "problems": sum(s.problems for s in result.scores), "k": None,
                      "mean@k": round(sum(s.mean_at_k for s in result.scores) / len(result.scores), 4),
                      "pass@k": round(sum(s.pass_at_k for s in result.scores) / len(result.scores), 4)})
    create_table_artifact(table=table, key=f"evaluation-{_slug(result.metrics_path.parent.name)}",
                          description=f"attnrl evaluate: mean@K / pass@K of {model_dir or 'the initial policy'}")
    return result


@task(name="report", **_COMMON)
def report_task(config: RunConfig, root: str | Path = ".") -> ReportResult:
    result = build_report(config, root)
    _summary("report", [("report", result.html_path), ("figures", ", ".join(p.name for p in result.figures))])
    return result


def _gate(config: RunConfig, gate: Callable[[Path], Any]) -> Callable[[Path], Any] | None:
    """The stage's output check (its data-check task on the new output), unless checks are off."""
    return gate if config.checks.enabled else None


def _slug(text: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "eval"
