"""The console of an ``attnrl`` command: Prefect's run-life lines off the console (not off the run's logs),
and one readable line per finished stage."""

from __future__ import annotations

import logging
from pathlib import Path

from attnrl.eval.metrics import BenchmarkScore
from attnrl.stages.results import EvaluationResult, TrainResult, WarmupResult
from attnrl.utils.progress import Progress, duration
from flows.console import ConsoleFilter, headline


def _record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)


def test_the_run_life_lines_are_dropped_and_everything_else_passes():
    keep = ConsoleFilter().filter
    assert not keep(_record("prefect.task_runs", "Finished in state Completed()"))
    assert not keep(_record("prefect.flow_runs", "Beginning subflow run 'x' for flow 'warmup'"))
    assert not keep(_record("prefect.task_runs", "Created task run 'step-3' for task 'train-phase'"))
    assert not keep(_record("prefect.flow_runs", "View at http://127.0.0.1:4200/runs/flow-run/1"))
    assert keep(_record("prefect.flow_runs", "warmup: done in 2m10s: final loss 0.412"))
    assert keep(_record("prefect.task_runs", "step 3/15  reward 0.500  tokens 9000  4.1s"))
    assert keep(_record("attnrl.warmup", "Finished in state of mind"))  # not Prefect's: kept
    notice = _record("prefect", "Starting temporary server on http://127.0.0.1:8010\nSee https://www.prefect.io/docs")
    assert keep(notice) and notice.getMessage() == "Starting temporary server on http://127.0.0.1:8010"


def test_progress_lines_leave_the_console_to_the_bar_that_shows_them():
    keep = ConsoleFilter().filter
    logger = logging.getLogger("attnrl.test_console")
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for bar in (True, False):
            with Progress(logger, "warmup", 2, "steps", every_s=0, bar=bar) as progress:
                progress.update(loss=0.5)
                progress.update(loss=0.25)
    finally:
        logger.removeHandler(handler)
    lines = [(r.getMessage(), keep(r)) for r in seen]
    assert len(lines) == 4
    assert lines[0][0].startswith("warmup: 1/2 steps (50%)  loss 0.5  ") and lines[0][0].endswith(" left")
    assert not lines[0][1]
    # The last line comes after the bar is gone: on the console either way.
    assert lines[1][0].startswith("warmup: 2/2 steps (100%)  loss 0.25  in ") and lines[1][1]
    assert [keep for _, keep in lines[2:]] == [True, True]


def test_a_loop_that_ends_early_says_so_without_an_estimate():
    progress = Progress(logging.getLogger("attnrl.test_console"), "train", 15, "steps", start=3, bar=False)
    progress.update(reward=0.5)
    assert progress.line().startswith("train: 4/15 steps (27%)  reward 0.5  ") and progress.line().endswith(" left")
    progress.close(log=False)
    assert progress.line().startswith("train: 4/15 steps (27%)  reward 0.5  stopped after ")


def test_a_stage_result_reads_as_one_line(tmp_path):
    scores = [BenchmarkScore("synthetic-L1", 10, 4, 0.5, 1.0), BenchmarkScore("synthetic-L2", 10, 4, 0.25, 0.5)]
    evaluation = EvaluationResult(scores, tmp_path / "metrics.json", tmp_path / "samples.parquet")
    assert headline(evaluation) == "mean@K 37.5%, pass@K 75.0% over 2 benchmarks"
    rows = [{"step": 1.0, "reward": 0.25}, {"step": 2.0, "reward": 0.5}]
    resumed = Path("runs/train/checkpoints/step_000001")
    trained = TrainResult(tmp_path / "final", tmp_path / "metrics.jsonl", rows, resumed, 0)
    assert headline(trained) == "2 steps, reward 0.250 -> 0.500, resumed from step_000001"
    warmed = WarmupResult(tmp_path / "init", [{"step": 50, "loss": 0.41234}])
    assert headline(warmed) == f"final loss 0.412 -> {tmp_path / 'init'}"
    assert (duration(12.4), duration(130), duration(119.6), duration(89.6)) == ("12s", "2m10s", "2m00s", "1m30s")
