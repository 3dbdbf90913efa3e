"""DVCLive logs of training and evaluation metrics, so ``dvc exp show``, ``dvc plots`` and the rest of
the DVC tooling read them natively (docs/orchestration.md, "Versioned stages").

* Training: ``runs/train/dvclive/`` holds one ``plots/metrics/<name>.tsv`` per spec §15.4 metric
  (step, value) and ``metrics.json``, the last step's values. ``metrics.jsonl``, which the core
  writes and a checkpoint restores, stays the record; this log follows it: the first step a run
  logs rewrites the directory from the whole history (a resumed run's restored steps, none of the
  steps after the checkpoint it resumed from), every later step is appended.
* Evaluation: ``<eval dir>/dvclive/metrics.json``, mean@K and pass@K per benchmark and their average.

DVCLive is used as a logger only: no ``dvc.yaml`` of its own (the project's declares the plots and
metrics) and no experiment saved (the pipeline saves the whole run as one, ``--experiment``).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attnrl.utils.atomic import atomic_path

LIVE_DIR = "dvclive"
STEP = "step"

# DVCLive logs every Live() at INFO ("Logging to experiment ..."); a stage's console needs none of it.
logging.getLogger("dvclive").setLevel(logging.WARNING)


def _live(directory: Path, *, resume: bool) -> Any:
    from dvclive import Live

    return Live(dir=str(directory), resume=resume, save_dvc_exp=False, dvcyaml=None)


def _log_rows(live: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Training steps: every finite number but the step itself, at that step; then the summary (the last)."""
    for row in rows:
        live.step = int(row[STEP])
        for name, value in row.items():
            if name != STEP and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                live.log_metric(name, value)
    live.make_summary()


class LiveTrainMetrics:
    """The DVCLive log of one train stage run in ``run_dir/dvclive``; call it with the whole metrics
    history after every step (``train(on_metrics=...)``), and ``sync`` once when training ends."""

    def __init__(self, run_dir: str | Path) -> None:
        self.directory = Path(run_dir) / LIVE_DIR
        self._live: Any = None
        self._logged = 0

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if self._live is None:
            self.sync(rows)
            return
        _log_rows(self._live, rows[self._logged:])
        self._logged = len(rows)

    def sync(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Rewrite the log from ``rows`` (unless this run already logged exactly them), then keep appending."""
        if self._live is not None and self._logged == len(rows):
            return
        with atomic_path(self.directory) as tmp:
            _log_rows(_live(tmp, resume=False), rows)
        self._live = _live(self.directory, resume=True)
        self._logged = len(rows)


def write_eval_metrics(eval_dir: str | Path, summary: Mapping[str, Any]) -> Path:
    """``eval_dir/dvclive/metrics.json``, ``{<benchmark>: {mean_at_k, pass_at_k}, ..., average: {...}}``,
    from ``summary``, the evaluation's ``metrics.json`` content (``attnrl.eval.metrics.summarise``, spec §14)."""
    scores = {row["benchmark"]: row for row in summary["benchmarks"]} | {"average": summary["average"]}
    directory = Path(eval_dir) / LIVE_DIR
    with atomic_path(directory) as tmp:
        live = _live(tmp, resume=False)
        for benchmark, row in scores.items():
            for key in ("mean_at_k", "pass_at_k"):
                live.log_metric(f"{benchmark}/{key}", row[key], plot=False)
        live.make_summary()
        shutil.rmtree(live.plots_dir, ignore_errors=True)  # nothing plotted: no empty folder
    return directory / "metrics.json"
