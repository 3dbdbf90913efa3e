"""Checks between pipeline stages: read each stage's outputs back and validate them.

A stop-gap until the data-check issue brings the real data checks: every check raises ``DataError``
naming the file at fault, so the pipeline stops before the next stage starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from attnrl.config.schema import RunConfig
from attnrl.data.loaders import load_verl_parquet
from attnrl.errors import DataError
from attnrl.stages.layout import Layout
from attnrl.stages.prepare import benchmark_name


def check_prepared(config: RunConfig, root: str | Path = ".") -> dict[str, int]:
    """The prepared training file and every benchmark file load as verl parquet and are not empty."""
    layout = Layout.of(config, root)
    files = {"train": layout.prepared_train}
    files.update({benchmark_name(spec): layout.prepared_eval(benchmark_name(spec)) for spec in config.data.eval})
    counts = {}
    for name, path in files.items():
        problems = load_verl_parquet(path)
        if not problems:
            raise DataError(f"check prepare: {path} has no rows")
        counts[name] = len(problems)
    return counts


def check_model_dir(model_dir: str | Path) -> Path:
    """A policy directory written by ``save_pretrained`` (or a recorded source checkpoint)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() and not (model_dir / "source.json").is_file():
        raise DataError(f"check model: {model_dir} has no config.json")
    return model_dir


def check_difficulty(config: RunConfig, root: str | Path = ".") -> int:
    """The kept problems load as verl parquet and at least one remains to train on."""
    path = Layout.of(config, root).difficulty_dir / "train.parquet"
    problems = load_verl_parquet(path)
    if not problems:
        raise DataError(f"check difficulty: {path} kept no problems to train on")
    return len(problems)


def check_train_metrics(path: str | Path, expected_steps: int | None = None) -> int:
    """Every row of ``metrics.jsonl`` parses as a JSON object with a step number; with
    ``expected_steps``, there is one row per step (fewer only when a token budget ended the run
    early, which the caller signals by passing None)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"check train: {path} is missing")
    rows = 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"check train: {path} line {number} is not valid JSON: {exc}") from None
        if not isinstance(row, dict) or "step" not in row:
            raise DataError(f"check train: {path} line {number} is not a metrics row with a 'step'")
        rows += 1
    if expected_steps is not None and rows != expected_steps:
        raise DataError(f"check train: {path} has {rows} rows, expected {expected_steps} steps")
    return rows


def check_eval_metrics(path: str | Path) -> dict:
    """``metrics.json`` holds per-benchmark scores and their average."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"check evaluate: {path} is missing")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"check evaluate: {path} is not valid JSON: {exc}") from None
    missing = [key for key in ("benchmarks", "average") if not isinstance(metrics, dict) or key not in metrics]
    if missing:
        raise DataError(f"check evaluate: {path} lacks {missing}")
    if not metrics["benchmarks"]:
        raise DataError(f"check evaluate: {path} has no benchmarks")
    return metrics


def check_report(html_path: str | Path) -> Path:
    html_path = Path(html_path)
    if not html_path.is_file() or html_path.stat().st_size == 0:
        raise DataError(f"check report: {html_path} is missing or empty")
    return html_path


_CHECK = {"cache_policy": NO_CACHE, "persist_result": False}
check_prepared_task = task(name="check prepared data", **_CHECK)(check_prepared)
check_model_dir_task = task(name="check model dir", **_CHECK)(check_model_dir)
check_difficulty_task = task(name="check difficulty", **_CHECK)(check_difficulty)
check_train_metrics_task = task(name="check train metrics", **_CHECK)(check_train_metrics)
check_eval_metrics_task = task(name="check eval metrics", **_CHECK)(check_eval_metrics)
check_report_task = task(name="check report", **_CHECK)(check_report)
