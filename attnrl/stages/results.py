"""What each stage returns. Kept apart from the stages' code so that the flows, the console and Prefect
(which loads a flow's module only to read its definition, e.g. to look for cancellation hooks in a fresh
process) read these types without importing torch or transformers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attnrl.eval.metrics import BenchmarkScore
from attnrl.sampling import RunningMean


@dataclass(frozen=True)
class PreparedData:
    train_path: Path
    train_count: int
    eval_paths: dict[str, Path]
    eval_counts: dict[str, int]
    dropped_overlong: int


@dataclass(frozen=True)
class WarmupResult:
    model_dir: Path
    history: list[dict[str, float]]


@dataclass(frozen=True)
class DifficultyResult:
    table_path: Path
    train_path: Path
    estimated: int
    kept: int
    easy_mean: RunningMean


@dataclass(frozen=True)
class TrainResult:
    final_model: Path
    metrics_path: Path
    metrics: list[dict[str, float]]
    resumed_from: Path | None
    generated_tokens: int  # everything the run generated, untrained rounds included (the token budget's count)


@dataclass(frozen=True)
class EvaluationResult:
    scores: list[BenchmarkScore]
    metrics_path: Path
    samples_path: Path


@dataclass(frozen=True)
class ReportResult:
    html_path: Path
    figures: tuple[Path, ...]
