"""Checks between stages: Great Expectations gates on the data a stage hands on, plain checks elsewhere.

The gates (``infra/data_gates.py``) run inside the stage tasks, on a stage's complete new output
while it still sits at its temporary path (prepared problems, the difficulty table, evaluation
results): a failing gate leaves the previous output in place. The train flow also gates its input
problems before training and every step's rollout batch before the update. A failing gate raises
``DataGateError`` (a ``DataError``: never retried) naming the failing expectation and rows, with
the GX Data Docs report path, so the flow stops before the next stage starts. Every stage's gates
link the Data Docs (the history of every gate run in the project's GX context) from its Prefect run
as a link artifact (key ``data-checks``), as does a failing rollout-batch gate. Outputs without a
suite (model directories, training metrics, the report) get plain read-back checks.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec

from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE

from attnrl.config.schema import RunConfig
from attnrl.errors import DataError
from attnrl.model.policy import policy_tokenizer
from attnrl.rollout.prompts import encode_prompt
from attnrl.stages.layout import TRAIN_FILE, Layout, eval_file
from attnrl.stages.prepare import benchmark_name
from attnrl.stages.train import training_problems_path
from attnrl.training.loop import BatchCheck
from infra import data_gates
from infra.data_gates import DataGateError, GateReport

DOCS_ARTIFACT = "data-checks"
P = ParamSpec("P")


def gate_problem_files(config: RunConfig, files: list[tuple[Path, Path]], root: str | Path = ".") -> list[GateReport]:
    """The ``prepared_problems`` suite on each (file to read, path to name it by) pair."""
    tokenizer = policy_tokenizer(config)
    docs = Layout.of(config, root).data_docs(config)
    reports = []
    for path, name in files:
        if not path.is_file():
            raise DataError(f"data check prepared_problems: {name} is missing")
        frame = data_gates.prepared_frame(path, lambda messages: encode_prompt(tokenizer, messages))
        reports.append(data_gates.run_gate("prepared_problems", frame, config, target=str(name), docs_dir=docs))
    return reports


def gate_prepared(config: RunConfig, root: str | Path, directory: Path) -> list[GateReport]:
    """Stage 'prepare': the training file and every benchmark file of a new ``data/prepared`` at ``directory``."""
    final = Layout.of(config, root).prepared_dir
    names = [TRAIN_FILE] + [eval_file(benchmark_name(spec)) for spec in config.data.eval]
    return gate_problem_files(config, [(directory / name, final / name) for name in names], root)


def gate_training_input(config: RunConfig, root: str | Path = ".") -> list[GateReport]:
    """Stage 'train': the problems it is about to read, whoever wrote them (a pull, an edit)."""
    path = training_problems_path(config, root)
    return gate_problem_files(config, [(path, path)], root)


def gate_difficulty(config: RunConfig, root: str | Path, directory: Path) -> list[GateReport]:
    """Stage 'difficulty': the table and the kept problems of a new ``data/difficulty`` at ``directory``
    (the stage off: only the problems it passed through; its table is empty by design)."""
    layout = Layout.of(config, root)
    table = directory / "difficulty.parquet"
    if not table.is_file():
        raise DataError(f"data check difficulty_table: {layout.difficulty_dir / table.name} is missing")
    reports = []
    if config.difficulty.enabled:
        reports.append(data_gates.run_gate("difficulty_table", data_gates.difficulty_frame(table), config,
                                           target=str(layout.difficulty_dir / table.name),
                                           docs_dir=layout.data_docs(config)))
    return reports + gate_problem_files(config, [(directory / TRAIN_FILE, layout.difficulty_dir / TRAIN_FILE)], root)


def gate_evaluation(config: RunConfig, root: str | Path, directory: Path, name: Path) -> list[GateReport]:
    """Stage 'evaluate': ``samples.parquet`` and ``metrics.json`` of a new output at ``directory``
    (reported as ``name``)."""
    samples_path, metrics_path = directory / "samples.parquet", directory / "metrics.json"
    for path in (samples_path, metrics_path):
        if not path.is_file():
            raise DataError(f"data check eval_results: {Path(name) / path.name} is missing")
    samples, metrics = data_gates.eval_frames(samples_path, metrics_path)
    docs = Layout.of(config, root).data_docs(config)
    return [data_gates.run_gate("eval_results", samples, config, target=str(Path(name) / samples_path.name),
                                docs_dir=docs),
            data_gates.run_gate("eval_metrics", metrics, config, target=str(Path(name) / metrics_path.name),
                                docs_dir=docs)]


def rollout_batch_gate(config: RunConfig, root: str | Path = ".") -> BatchCheck:
    """The ``rollout_batch`` suite on every ``checks.rollout_every``-th training step, before its update."""
    docs = Layout.of(config, root).data_docs(config)

    def check(step: int, paths) -> None:
        if paths and step % config.checks.rollout_every == 0:
            try:
                data_gates.run_gate("rollout_batch", data_gates.rollout_frame(paths), config,
                                    target=f"training step {step} rollout batch", docs_dir=docs)
            except DataGateError as failed:  # linked only on failure: a link per passing step would bury the rest
                _link_failure(failed)
                raise

    return check


def _linking_docs(gate: Callable[P, list[GateReport]]) -> Callable[P, list[GateReport]]:
    """``gate`` that links the Data Docs from the Prefect run it runs in, passed or failed."""
    @functools.wraps(gate)
    def run(*args: P.args, **kwargs: P.kwargs) -> list[GateReport]:
        try:
            reports = gate(*args, **kwargs)
        except DataGateError as failed:
            _link_failure(failed)
            raise
        if reports:
            _link_docs(reports[0].docs, "data checks passed: " + "; ".join(f"{r.suite} on {r.target}" for r in reports))
        return reports

    return run


def _link_failure(failed: DataGateError) -> None:
    _link_docs(failed.docs, f"data check {failed.suite} FAILED on {failed.target}")


def _link_docs(index: Path | None, what: str) -> None:
    if index is not None:
        create_link_artifact(link=index.resolve().as_uri(), link_text="GX Data Docs: every data check of this project",
                             key=DOCS_ARTIFACT, description=what)


def check_model_dir(model_dir: str | Path) -> Path:
    """A policy directory written by ``save_pretrained`` (or a recorded source checkpoint)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() and not (model_dir / "source.json").is_file():
        raise DataError(f"check model: {model_dir} has no config.json")
    return model_dir


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


def check_report(html_path: str | Path) -> Path:
    html_path = Path(html_path)
    if not html_path.is_file() or html_path.stat().st_size == 0:
        raise DataError(f"check report: {html_path} is missing or empty")
    return html_path


_CHECK = {"cache_policy": NO_CACHE, "persist_result": False}
gate_prepared_task = task(name="data check: prepared problems", **_CHECK)(_linking_docs(gate_prepared))
gate_training_input_task = task(name="data check: training problems", **_CHECK)(_linking_docs(gate_training_input))
gate_difficulty_task = task(name="data check: difficulty table", **_CHECK)(_linking_docs(gate_difficulty))
gate_evaluation_task = task(name="data check: evaluation results", **_CHECK)(_linking_docs(gate_evaluation))
check_model_dir_task = task(name="check model dir", **_CHECK)(check_model_dir)
check_train_metrics_task = task(name="check train metrics", **_CHECK)(check_train_metrics)
check_report_task = task(name="check report", **_CHECK)(check_report)
