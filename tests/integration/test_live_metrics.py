"""The DVCLive logs follow the metrics record: a resumed run's log holds the steps it restored and the ones it
trained, never a step the crashed run logged after its last checkpoint; evaluation summaries per benchmark."""

from __future__ import annotations

import csv
import json

from infra.live_metrics import LiveTrainMetrics, write_eval_metrics


def _row(step: int, reward: float) -> dict[str, float]:
    return {"step": float(step), "reward": reward, "entropy": 0.5 + step, "loss/clip_frac": float("nan")}


def _logged(run_dir, name: str) -> list[tuple[int, float]]:
    with (run_dir / "dvclive" / "plots" / "metrics" / f"{name}.tsv").open() as handle:
        return [(int(r["step"]), float(r[name.rsplit("/", 1)[-1]])) for r in csv.DictReader(handle, delimiter="\t")]


def test_a_resumed_run_logs_its_restored_steps_then_its_own_and_nothing_the_crashed_run_logged_after(tmp_path):
    crashed = LiveTrainMetrics(tmp_path)
    history: list[dict[str, float]] = []
    for step in (1, 2, 3):  # checkpoint at step 2, then the run dies after logging step 3
        history.append(_row(step, 0.1 * step))
        crashed(history)
    assert _logged(tmp_path, "reward") == [(1, 0.1), (2, 0.2), (3, 0.1 * 3)]

    resumed = LiveTrainMetrics(tmp_path)
    restored = history[:2]
    for step, reward in ((3, 0.9), (4, 0.8)):  # step 3 again, with other samples
        restored.append(_row(step, reward))
        resumed(restored)
    logged = (tmp_path / "dvclive").stat().st_ino
    resumed.sync(restored)  # the end of training: nothing to rewrite, so the log stays where it is
    assert (tmp_path / "dvclive").stat().st_ino == logged
    assert _logged(tmp_path, "reward") == [(1, 0.1), (2, 0.2), (3, 0.9), (4, 0.8)]
    assert _logged(tmp_path, "entropy") == [(s, 0.5 + s) for s in (1, 2, 3, 4)]
    summary = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert summary["step"] == 4 and summary["reward"] == 0.8
    assert "loss" not in summary  # a non-finite value is not a point
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_run_that_trains_no_step_still_leaves_the_log_of_its_history(tmp_path):
    LiveTrainMetrics(tmp_path).sync([_row(1, 0.25), _row(2, 0.5)])
    assert _logged(tmp_path, "reward") == [(1, 0.25), (2, 0.5)]


def test_the_evaluation_summary_has_every_benchmark_and_the_average(tmp_path):
    summary = {"benchmarks": [{"benchmark": "synthetic-L1", "problems": 3, "k": 4, "mean_at_k": 0.5, "pass_at_k": 1.0},
                              {"benchmark": "aime24", "problems": 30, "k": 4, "mean_at_k": 0.25, "pass_at_k": 0.5}],
               "average": {"mean_at_k": 0.375, "pass_at_k": 0.75}}
    written = json.loads(write_eval_metrics(tmp_path, summary).read_text())
    assert written == {"synthetic-L1": {"mean_at_k": 0.5, "pass_at_k": 1.0},
                       "aime24": {"mean_at_k": 0.25, "pass_at_k": 0.5},
                       "average": {"mean_at_k": 0.375, "pass_at_k": 0.75}}
    assert sorted(p.name for p in (tmp_path / "dvclive").iterdir()) == ["metrics.json"]
