"""Stopping a command as a person does: Ctrl-C (SIGINT to the terminal's process group) and SIGTERM (``kill``,
a scheduler) stop ``attnrl <stage>`` within seconds in the warmup, inside a training step with a Ray rollout
actor, and in an evaluation; the exit status is the signal's (130, 143) and one line says what was stopped and
what is kept; afterwards no process the command started is alive (the temporary Prefect API included) and
the workspace lock is free. A stress test delivers SIGTERM at 20 random moments of short runs and every one
stops its run.

The project is a DVC project (runs take the workspace lock) whose inputs (prepared problems, the warmed-up
policy) are made once for the module; every run here has overrides, so it writes to its own isolated root.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest

from prefect import flow
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterName,
    TaskRunFilterStartTime,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run

from attnrl.config import resolve_config
from attnrl.stages.layout import Layout
from attnrl.training.checkpoint import latest_checkpoint
from flows.workspace import isolated_root, lock_name, workspace_lock
from tests.conftest import PROJECT_ROOT, locked_project, small_overrides

pytestmark = pytest.mark.integration

ATTNRL = str(Path(sys.executable).with_name("attnrl"))
STOP_WITHIN_S = 10.0
STARTS_WITHIN_S = 90.0
HARNESS = Path(__file__).with_name("stop_harness.py")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return locked_project(tmp_path_factory.mktemp("project"))


def _env(api_url: str | None, home: Path) -> dict[str, str]:
    """The command's environment: reporting to ``api_url``, or (None) to a temporary API of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1"}
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


@dataclass
class Watched:
    """A command started in its own session, its output lines as they come, and every process it started."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    started: dict[int, tuple[float, str]] = field(default_factory=dict)  # pid -> (create time, command line)

    def wait_for_line(self, text: str, timeout: float = STARTS_WITHIN_S) -> str:
        deadline = time.monotonic() + timeout
        while not (found := [line for line in self.lines if text in line]):
            assert self.process.poll() is None, f"exited with {self.process.returncode} before {text!r}:\n" + self.output
            assert time.monotonic() < deadline, f"no {text!r} within {timeout:.0f}s:\n" + self.output
            time.sleep(0.1)
        return found[0]

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def alive(self) -> list[str]:
        """The processes it started that still run (a zombie has ended)."""
        left = []
        for pid, (created, command) in self.started.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {command}")
            except psutil.NoSuchProcess:
                pass
        return left


def _start(project: Path, stage: str, overrides: list[str], env: dict[str, str]) -> Watched:
    sets = [arg for override in overrides for arg in ("--set", override)]
    process = subprocess.Popen([ATTNRL, stage, "--config", str(project / "params.yaml"), "--root", str(project), *sets],
                               cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    watched = Watched(process)

    def read() -> None:
        for line in process.stdout:
            watched.lines.append(line.rstrip("\n"))

    def watch() -> None:
        while process.poll() is None:
            try:
                children = psutil.Process(process.pid).children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                try:
                    created, command = child.create_time(), child.cmdline()
                except psutil.Error:  # gone since the scan: what was seen of it stays
                    continue
                # Seen again, as it runs now: a child caught between its fork and its exec shows its parent's
                # command line (the temporary API forks to set its parent-death signal before it execs). A
                # process on its way out shows none: the last one seen stays.
                if command or child.pid not in watched.started:
                    watched.started[child.pid] = (created, " ".join(command[:6]))
            time.sleep(0.25)  # a scan of /proc costs CPU the command needs

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=watch, daemon=True).start()
    return watched


def _wait_running(api_url: str, task: str, since: float, watched: Watched) -> None:
    """Until the API shows a running task run of ``task`` that started after ``since`` (epoch seconds)."""
    deadline = time.monotonic() + STARTS_WITHIN_S
    running = TaskRunFilter(name=TaskRunFilterName(like_=f"{task}-"),
                            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING])),
                            start_time=TaskRunFilterStartTime(after_=datetime.fromtimestamp(since - 1, timezone.utc)))
    with SyncPrefectClient(api_url) as client:
        while not client.read_task_runs(task_run_filter=running):
            assert watched.process.poll() is None, f"exited with {watched.process.returncode}:\n{watched.output}"
            assert time.monotonic() < deadline, f"no running {task!r} task within {STARTS_WITHIN_S:.0f}s:\n{watched.output}"
            time.sleep(0.2)


TEMPORARY_API = "started a temporary Prefect API at "
# (stage, signal, report to the session's API (True) or to a temporary one of the command's own, overrides)
CASES = [
    ("warmup", signal.SIGINT, True, ["warmup.steps=100000"]),
    ("warmup", signal.SIGTERM, False, ["warmup.steps=100000"]),
    ("train", signal.SIGINT, True, ["train.steps=1000", "train.save_every=1", "rollout.ray.enabled=true"]),
    ("train", signal.SIGTERM, True, ["train.steps=1000", "train.save_every=1", "rollout.ray.enabled=true"]),
    ("evaluate", signal.SIGINT, True, ["data.eval.0.k=256"]),
    ("evaluate", signal.SIGTERM, True, ["data.eval.0.k=256"]),
]


@pytest.mark.parametrize("stage,signum,shared,extra", CASES,
                         ids=[f"{stage}-{signal.Signals(s).name}" for stage, s, _, _ in CASES])
def test_a_signal_stops_the_command_within_seconds_and_leaves_nothing_behind(project, prefect_api, tmp_path, stage,
                                                                              signum, shared, extra):
    overrides = small_overrides() + extra
    config = resolve_config(path=project / "params.yaml", overrides=overrides)
    own = isolated_root(project, config)
    since = time.time()
    watched = _start(project, stage, overrides, _env(str(prefect_api.api_url) if shared else None, tmp_path))
    try:
        if shared:
            api_url = str(prefect_api.api_url)
        else:
            line = watched.wait_for_line(TEMPORARY_API)
            api_url = line.split(TEMPORARY_API)[1].split()[0]
        if stage == "train":
            watched.wait_for_line("/1000 steps")  # a step done (or resumed from the other case's run): inside the next
        else:
            _wait_running(api_url, stage, since, watched)
        time.sleep(random.uniform(0.5, 2.0))
        sent = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(watched.process.pid, signum)  # what a terminal's Ctrl-C does
        else:
            watched.process.send_signal(signum)
        watched.process.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if watched.process.poll() is None:
            os.killpg(watched.process.pid, signal.SIGKILL)
            watched.process.wait()
    time.sleep(0.2)  # the reader thread's last lines
    name = signal.Signals(signum).name
    assert watched.process.returncode == 128 + signum, watched.output
    assert took <= STOP_WITHIN_S, f"stopped {took:.1f}s after {name}:\n{watched.output}"
    [stopped] = [line for line in watched.lines if line.startswith(f"attnrl {stage}: stopped by {name} during {stage}")]
    assert not watched.alive(), f"left running: {watched.alive()}\n{watched.output}"
    assert any("prefect.server" in command for _, command in watched.started.values()) != shared
    if shared:  # the lock is on the session's API, which outlives the command
        assert prefect_api.read_global_concurrency_limit_by_name(lock_name(own)).active_slots == 0
    if stage == "train":
        assert "ray::" in " ".join(command for _, command in watched.started.values()) or any(
            "raylet" in command for _, command in watched.started.values()), watched.started
        newest = latest_checkpoint(own / "runs" / "train" / "checkpoints")
        assert newest is not None and f"newest checkpoint {newest} " in stopped, stopped
    if stage == "warmup":  # its output is written whole or not at all
        assert not Layout.of(config, own).init_model.exists()


def test_a_killed_command_leaves_no_process_behind(project, tmp_path):
    """SIGKILL runs no handler: the temporary API gets SIGTERM from the kernel (its parent-death signal)."""
    watched = _start(project, "warmup", [*small_overrides(), "warmup.steps=100000", "seed=7"], _env(None, tmp_path))
    try:
        watched.wait_for_line(TEMPORARY_API)
        time.sleep(2.0)
        os.kill(watched.process.pid, signal.SIGKILL)
        assert watched.process.wait(timeout=10) == -signal.SIGKILL
    finally:
        if watched.process.poll() is None:
            os.killpg(watched.process.pid, signal.SIGKILL)
            watched.process.wait()
    deadline = time.monotonic() + STOP_WITHIN_S
    while watched.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not watched.alive(), f"left running after SIGKILL: {watched.alive()}"
    assert any("prefect.server" in command for _, command in watched.started.values()), watched.started


def test_sigterm_at_any_moment_of_a_run_stops_it(project, prefect_api):
    """20 runs of a short warmup in one process (the command's own ``main``), each sent SIGTERM at a random
    moment between its start and its usual end: every one returns 143 within the bound, with nothing left."""
    env = _env(str(prefect_api.api_url), project)
    argv = ["warmup", "--config", str(project / "params.yaml"), "--root", str(project)]
    for override in [*small_overrides(), "warmup.steps=20"]:
        argv += ["--set", override]
    done = subprocess.run([sys.executable, str(HARNESS), "--runs", "20", "--seed", "0", "--", *argv], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["usual_s"] > 0
    runs = report["runs"]
    assert len(runs) == 20
    for run in runs:
        assert run["status"] == 143, run
        assert run["stopped_after_s"] <= STOP_WITHIN_S, run
        assert run["left"] == [], run
    config = resolve_config(path=project / "params.yaml", overrides=[*small_overrides(), "warmup.steps=20"])
    assert prefect_api.read_global_concurrency_limit_by_name(lock_name(isolated_root(project, config))).active_slots == 0



held: dict[str, str] = {}
release = threading.Event()


@flow(name="hold-workspace")
def hold_workspace(root: str) -> None:
    """Hold ``root``'s workspace lock until the test releases it."""
    with workspace_lock(Path(root), None):
        held.update(name=flow_run.get_name(), id=flow_run.get_id())
        release.wait(timeout=120)


def test_a_run_waiting_for_the_workspace_lock_says_so_at_once_on_the_console_and_in_its_logs(project, prefect_api,
                                                                                              tmp_path):
    overrides = [*small_overrides(), "data.synthetic.train_per_level=41"]  # a root of its own
    own = isolated_root(project, resolve_config(path=project / "params.yaml", overrides=overrides))
    holder = threading.Thread(target=hold_workspace, args=(str(own),))
    holder.start()
    try:
        deadline = time.monotonic() + 60
        while not held:
            assert holder.is_alive() and time.monotonic() < deadline
            time.sleep(0.1)
        since = time.time()
        watched = _start(project, "prepare", overrides, _env(str(prefect_api.api_url), tmp_path))
        prepare_runs = FlowFilter(name=FlowFilterName(any_=["prepare"]))
        running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
                                start_time=FlowRunFilterStartTime(after_=datetime.fromtimestamp(since, timezone.utc)))
        deadline = time.monotonic() + STARTS_WITHIN_S
        while not (runs := prefect_api.read_flow_runs(flow_filter=prepare_runs, flow_run_filter=running)):
            assert watched.process.poll() is None and time.monotonic() < deadline, watched.output
            time.sleep(0.1)
        seen_running = time.monotonic()
        line = watched.wait_for_line("waiting for the workspace lock of ", timeout=30)
        said_after = time.monotonic() - seen_running
    finally:
        release.set()
        holder.join(timeout=60)
    assert said_after <= 5.0, f"{said_after:.1f}s: {line}\n{watched.output}"
    assert f"{own} ({lock_name(own)}): flow run {held['name']} ({held['id']}, started " in line, line
    assert watched.process.wait(timeout=120) == 0, watched.output
    watched.wait_for_line("after waiting")  # then it held the lock, and ran
    [run] = runs
    logs = prefect_api.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert any(log.message.startswith("waiting for the workspace lock of ") for log in logs), [l.message for l in logs]
