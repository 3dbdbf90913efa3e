"""The Prefect flows against a real Prefect API: the pipeline end to end, retries, fail-fast configs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)

from attnrl.config import dump_config, resolve_config
from attnrl.data.loaders import write_problems
from attnrl.errors import ConfigError, DataError
from attnrl.rollout.hf_engine import HFRolloutEngine
from attnrl.stages.layout import Layout
from flows.pipeline import pipeline, run_config_task
from flows.stages import prepare_flow, train_flow, warmup_flow
from tasks import finished_stages
from tasks import stages as stage_tasks
from tasks.retry import RETRIES, retry_unless_deterministic
from tests.conftest import PROJECT_ROOT, not_synthetic_problems, small_overrides

pytestmark = pytest.mark.integration
CONFIG = str(PROJECT_ROOT / "params.yaml")


def _flow_run(client, state):
    return client.read_flow_run(state.state_details.flow_run_id)


def _task_runs(client, flow_run_id):
    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_pipeline_runs_every_stage_as_a_completed_subflow(prefect_api, tmp_path):
    state = pipeline(config_path=CONFIG, overrides=small_overrides(), root=str(tmp_path), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert [s.benchmark for s in result.before.scores] == [s.benchmark for s in result.after.scores] == [
        "synthetic-L1", "synthetic-L2"]
    assert result.report.html_path == tmp_path / "reports" / "report.html"

    parent = _flow_run(prefect_api, state)
    subflows = prefect_api.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))
    )
    names = sorted(prefect_api.read_flow(run.flow_id).name for run in subflows)
    # difficulty is off in params.yaml: it passes the problems through
    assert names == ["difficulty", "evaluate", "evaluate", "prepare", "report", "train", "warmup"]
    assert all(run.state.is_completed() for run in subflows), [(run.name, run.state) for run in subflows]

    # The train flow shows every step and the phases inside it as task runs, all Completed.
    train_run = next(run for run in subflows if prefect_api.read_flow(run.flow_id).name == "train")
    task_runs = _task_runs(prefect_api, train_run.id)
    names = {run.name for run in task_runs}
    assert {"bootstrap", "step-1", "step-2", "generate", "score", "update"} <= names, names
    assert sum(run.name == "update" for run in task_runs) == 2
    assert all(run.state.is_completed() for run in task_runs), [(r.name, r.state) for r in task_runs]

    # Every stage's outputs, where the before/after evaluations and the report expect them.
    assert json.loads((tmp_path / "runs" / "eval-init" / "metrics.json").read_text())["benchmarks"]
    assert json.loads((tmp_path / "runs" / "eval" / "metrics.json").read_text())["average"]
    assert (tmp_path / "runs" / "train" / "final" / "config.json").is_file()
    assert (tmp_path / "reports" / "report.html").is_file()

    # The artifacts a person looks at: the evaluation tables, the last training steps, stage summaries.
    keys = ["evaluation-eval", "evaluation-eval-init", "train-last-steps", "prepare-summary", "report-summary"]
    # This pipeline's own: the session's Prefect API also holds other tests' artifacts under these keys.
    runs = [parent.id, *(run.id for run in subflows)]
    artifacts = prefect_api.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=keys), flow_run_id=ArtifactFilterFlowRunId(any_=runs)))
    assert {a.key for a in artifacts} == set(keys)
    table = json.loads(next(a for a in artifacts if a.key == "evaluation-eval").data)
    assert [row["benchmark"] for row in table] == ["synthetic-L1", "synthetic-L2", "average"]
    assert {"mean@k", "pass@k"} <= set(table[0])
    steps = json.loads(next(a for a in artifacts if a.key == "train-last-steps").data)
    assert [row["step"] for row in steps] == [1, 2]

    # What the console shows is in the runs' logs: a line per stage started and done with its headline,
    # and attnrl's own progress lines (warmup loss, evaluation) in the subflow they belong to.
    logs = _logs(prefect_api, parent.id, "report: done in")
    for name in ("prepare", "warmup", "difficulty", "evaluate_init", "train", "evaluate", "report"):
        assert f"{name}: started" in logs and any(m.startswith(f"{name}: done in ") for m in logs), (name, logs)
    assert any(m.startswith("train: done in ") and ": 2 steps, reward " in m for m in logs), logs
    warmup_run = next(run for run in subflows if prefect_api.read_flow(run.flow_id).name == "warmup")
    assert any(m.startswith("warmup: 5/5 steps (100%)  loss ") for m in _logs(prefect_api, warmup_run.id, "warmup: 5/5"))


def _logs(client, flow_run_id, expected: str, timeout: float = 30.0) -> list[str]:
    """The run's log messages, once one containing ``expected`` arrived (logs reach the API in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        messages = [log.message for log in client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
        if any(expected in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


def test_a_retried_pipeline_skips_the_stages_it_completed_and_reruns_the_one_that_failed(
        prefect_api, tmp_path, monkeypatch):
    reports = []

    def report_failing_once(config, root):
        reports.append(root)
        if len(reports) == 1:
            raise OSError("the report stage fails once (injected)")
        return build_report(config, root)

    build_report = stage_tasks.build_report
    monkeypatch.setattr(stage_tasks, "build_report", report_failing_once)
    retried = pipeline.with_options(retries=1, retry_delay_seconds=0)
    state = retried(config_path=CONFIG, overrides=small_overrides(), root=str(tmp_path), return_state=True)
    assert state.is_completed(), state.message
    assert len(reports) == 2
    assert (tmp_path / "reports" / "report.html").is_file()
    parent = _flow_run(prefect_api, state)
    assert parent.run_count == 2

    # Every stage's subflow ran once (report twice), and the second attempt said why it skipped each.
    subflows = prefect_api.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
    names = sorted(prefect_api.read_flow(run.flow_id).name for run in subflows)
    assert names == ["difficulty", "evaluate", "evaluate", "prepare", "report", "report", "train", "warmup"]
    logs = _logs(prefect_api, parent.id, "skipping evaluate:")
    for stage in ("prepare", "warmup", "difficulty", "evaluate_init", "train", "evaluate"):
        assert sum(m.startswith(f"skipping {stage}: an earlier attempt of this flow run completed it")
                   for m in logs) == 1, (stage, logs)
    assert not any(m.startswith("skipping report") for m in logs)
    stage_runs = [run for run in _task_runs(prefect_api, parent.id) if run.task_key.startswith("_stage_task")]
    assert sorted(run.state.name for run in stage_runs) == ["Cached"] * 6 + ["Completed"] * 7 + ["Failed"]


@flow(name="rewritten-between-attempts-test", retries=1, retry_delay_seconds=0)
def _rewritten_between_attempts(output: Path, calls: Path) -> str:
    """A stage that writes ``output``; the first attempt then rewrites it, as another writer would, and fails."""
    def stage() -> str:
        with calls.open("a") as log:
            log.write("run\n")
        output.write_text("stage output")
        return "done"

    result = finished_stages.run_stage("write", "digest", [output], stage)
    if len(calls.read_text().split()) == 1:
        output.write_text("someone else's output")
        raise OSError("the first attempt fails after its output was rewritten (injected)")
    return result


def test_a_stage_whose_outputs_changed_since_it_completed_is_run_again_on_retry(prefect_api, tmp_path):
    output, calls = tmp_path / "out.txt", tmp_path / "calls"
    state = _rewritten_between_attempts(output, calls, return_state=True)
    assert state.is_completed(), state.message
    assert calls.read_text().split() == ["run", "run"]
    assert output.read_text() == "stage output"
    logs = _logs(prefect_api, state.state_details.flow_run_id, "rerunning write")
    assert any(m.startswith("rerunning write: an earlier attempt of this flow run completed it") for m in logs), logs


def test_runs_on_one_root_take_turns_and_runs_on_another_root_go_on_side_by_side(prefect_api, tmp_path, monkeypatch):
    spans: dict[str, list[tuple[float, float]]] = {}

    def slow_prepare(config, root, check=None):
        started = time.monotonic()
        time.sleep(3)
        project = Path(root).relative_to(tmp_path).parts[0]  # the run's isolated root is inside its project
        spans.setdefault(project, []).append((started, time.monotonic()))
        return prepare(config, root, check=check)

    for project in ("shared", "other"):  # DVC projects, where runs lock their root
        (tmp_path / project / ".dvc").mkdir(parents=True)
        (tmp_path / project / "dvc.yaml").write_text("stages: {}\n")

    prepare = stage_tasks.prepare
    monkeypatch.setattr(stage_tasks, "prepare", slow_prepare)
    states = []
    threads = [threading.Thread(target=lambda r=root: states.append(prepare_flow(
        config_path=CONFIG, overrides=small_overrides(), root=str(tmp_path / r), return_state=True)))
        for root in ("shared", "shared", "other")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(states) == 3 and all(state.is_completed() for state in states), [s.message for s in states]
    (first, second), [other] = sorted(spans["shared"]), spans["other"]
    assert first[1] <= second[0], spans  # the second run on "shared" waited for the first's lock
    assert other[0] < max(first[1], second[1]) and other[1] > min(first[0], second[0]), spans  # no wait


@task(name="flaky read", retries=RETRIES, retry_delay_seconds=0, retry_condition_fn=retry_unless_deterministic)
def _flaky_read(counter: Path, source: Path, error: str) -> str:
    """Fails on its first call (a real exception, counted on disk), then reads ``source``."""
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls == 1:
        if error == "os":
            raise OSError(f"{source}: transient read error (injected)")
        raise DataError(f"{source}: malformed row 3 (injected)")
    return source.read_text()


@flow(name="flaky-read-test")
def _flaky_flow(counter: Path, source: Path, error: str) -> str:
    return _flaky_read(counter, source, error)


def test_a_transient_task_failure_is_retried_and_the_flow_completes(prefect_api, tmp_path):
    counter, source = tmp_path / "calls", tmp_path / "source.txt"
    source.write_text("ok")
    state = _flaky_flow(counter, source, "os", return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == "ok"
    assert counter.read_text() == "2"
    [run] = _task_runs(prefect_api, state.state_details.flow_run_id)
    assert run.run_count == 2 and run.state.is_completed()


def test_a_deterministic_task_failure_is_not_retried(prefect_api, tmp_path):
    counter, source = tmp_path / "calls", tmp_path / "source.txt"
    source.write_text("ok")
    state = _flaky_flow(counter, source, "data", return_state=True)
    assert state.is_failed()
    assert counter.read_text() == "1"
    [run] = _task_runs(prefect_api, state.state_details.flow_run_id)
    assert run.run_count == 1 and run.state.is_failed()


@flow(name="edited-between-attempts-test", retries=1, retry_delay_seconds=0)
def _edited_between_attempts(params: Path, attempts: Path) -> float:
    """Resolves the run's config and logs its learning rate to ``attempts``; the first attempt then
    edits ``params`` and fails."""
    config = run_config_task(str(params), None, None)
    with attempts.open("a") as log:
        log.write(f"{config.train.lr}\n")
    if len(attempts.read_text().split()) == 1:
        params.write_text(dump_config(resolve_config(path=params, overrides=["train.lr=0.5"])))
        raise OSError("the first attempt fails after params.yaml was edited (injected)")
    return config.train.lr


def test_a_retried_run_keeps_the_configuration_of_its_first_attempt(prefect_api, tmp_path):
    params, attempts = tmp_path / "params.yaml", tmp_path / "attempts"
    params.write_text(dump_config(resolve_config(preset="tiny")))
    first = resolve_config(path=params).train.lr
    state = _edited_between_attempts(params, attempts, return_state=True)
    assert state.is_completed(), state.message
    assert [float(lr) for lr in attempts.read_text().split()] == [first, first] and first != 0.5
    assert resolve_config(path=params).train.lr == 0.5  # the file did change in between
    assert _flow_run(prefect_api, state).run_count == 2


# pytest-timeout's own SIGALRM handler would make Prefect fall back to a watcher thread, which cannot
# interrupt a blocking call; a flow run by the CLI or a worker has the signal to itself.
@pytest.mark.timeout(600, method="thread")
def test_a_hung_generation_fails_the_train_task_at_its_timeout(prefect_api, tmp_path, monkeypatch):
    common = {"config_path": CONFIG, "overrides": [*small_overrides(), "timeouts.train_s=5"], "root": str(tmp_path)}
    prepare_flow(**common)
    warmup_flow(**common)
    monkeypatch.setattr(HFRolloutEngine, "generate", lambda self, *args, **kwargs: time.sleep(600))  # never answers
    started = time.monotonic()
    state = train_flow(**common, return_state=True)
    assert state.is_failed()
    assert time.monotonic() - started < 300  # bounded by the timeout (three attempts), not by the 600 s hang
    [train] = [run for run in _task_runs(prefect_api, state.state_details.flow_run_id) if run.name.startswith("train-")]
    assert train.run_count == 1 + RETRIES  # a hang may be transient: each retry is bounded again
    assert "exceeded timeout of 5" in train.state.message, train.state.message
    assert not (tmp_path / "runs" / "train" / "final").exists()


def test_a_config_error_inside_a_real_stage_task_is_not_retried(prefect_api, tmp_path):
    # SFT warmup on prepared problems of another source than the synthetic task is a ConfigError the warmup stage
    # itself raises, inside the task, once it has read them.
    config = resolve_config(path=CONFIG, overrides=small_overrides())
    write_problems(not_synthetic_problems(), Layout.of(config, tmp_path).prepared_train)
    state = warmup_flow(config_path=CONFIG, overrides=small_overrides(), root=str(tmp_path), return_state=True)
    assert state.is_failed()
    assert "warmup.enabled: SFT needs reference solutions" in state.message
    [run] = _task_runs(prefect_api, state.state_details.flow_run_id)
    assert run.run_count == 1 and run.state.is_failed()


@pytest.mark.parametrize(("stage_flow", "override", "field"), [
    (warmup_flow, "warmup.stepz=3", "warmup.stepz"),
    (train_flow, "train.lr=-1", "train.lr"),
])
def test_a_bad_config_fails_the_stage_flow_fast_naming_the_field(prefect_api, tmp_path, stage_flow, override, field):
    state = stage_flow(config_path=CONFIG, overrides=[*small_overrides(), override], root=str(tmp_path),
                       return_state=True)
    assert state.is_failed()
    assert field in state.message
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        state.result()
    run = _flow_run(prefect_api, state)
    assert run.run_count == 1 and run.state.is_failed()
    assert _task_runs(prefect_api, run.id) == []  # failed before any stage task started
    assert not (tmp_path / "models").exists()
