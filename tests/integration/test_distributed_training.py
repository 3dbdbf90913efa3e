"""The train flow on the distributed runtime: 2 gloo trainer ranks and 1 hf rollout actor on
Ray, split placement with the engines scoring the next batch during the update. A rollout actor killed
mid-run is replaced; a trainer rank SIGKILLed mid-run fails the train task naming the rank, the task's
retry resumes from the newest checkpoint, and the final weights equal a run that lost no rank. The paper
preset's colocated layout scaled to CPU is rehearsed in test_paper_rehearsal.py."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import torch
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from safetensors.torch import load_file

from flows.stages import prepare_flow, train_flow, warmup_flow
from tests.conftest import PROJECT_ROOT, small_overrides

CONFIG = str(PROJECT_ROOT / "params.yaml")
OVERRIDES = [*small_overrides(), "distributed.enabled=true", "train.steps=3", "train.save_every=1",
             "train.keep_checkpoints=2"]


def _ray_workers(title: str) -> list[psutil.Process]:
    """The Ray worker processes of this test process's own Ray (its descendants: the flows start Ray here) whose
    title starts with ``ray::<title>`` (e.g. TrainerRank); another test's Ray, in another xdist worker, is not seen."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            cmdline = process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if cmdline and cmdline[0].startswith(f"ray::{title}"):
            found.append(process)
    return found


def _workers_left(*titles: str, grace_s: float = 10.0) -> list[psutil.Process]:
    """The ``titles``' Ray workers still alive ``grace_s`` after the runtime stopped them: ray.kill returns
    before the process is gone (a replacement actor still in ``__init__`` took about a second in CI)."""
    deadline = time.monotonic() + grace_s
    while (left := [w for title in titles for w in _ray_workers(title)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _kill_when(root: Path, checkpoint: str, title: str, killed: list[str]) -> threading.Thread:
    """A watcher that SIGKILLs one ``title`` worker as soon as ``checkpoint`` is the newest, and records the newest
    checkpoint just after the kill: on 2 busy cores the kill can land a step or more after ``checkpoint``."""
    latest = root / "runs" / "train" / "checkpoints" / "latest"

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if latest.is_file() and latest.read_text().strip() == checkpoint:
                victims = _ray_workers(title)
                if victims:
                    os.kill(victims[-1].pid, signal.SIGKILL)
                    killed.append(latest.read_text().strip())
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _final_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "runs" / "train" / "final" / "model.safetensors"))


def test_faults_on_the_distributed_runtime_leave_the_run_exact(prefect_api, tmp_path):
    common = {"config_path": CONFIG, "overrides": OVERRIDES}
    engine_killed, rank_killed = tmp_path / "engine-killed", tmp_path / "rank-killed"
    prepare_flow(**common, root=str(engine_killed))
    warmup_flow(**common, root=str(engine_killed))
    shutil.copytree(engine_killed, rank_killed)

    # A rollout actor killed in step 2: replaced with the latest weights, and the step completes.
    killed: list[str] = []
    watcher = _kill_when(engine_killed, "step_000001", "EngineWorker", killed)
    first = train_flow(**common, root=str(engine_killed))
    watcher.join()
    assert killed, "no rollout actor was found to kill"
    assert [int(row["step"]) for row in first.metrics] == [1, 2, 3]
    assert first.metrics[-1]["engines_replaced"] == 1.0
    assert not _workers_left("TrainerRank", "EngineWorker")  # the runtime stopped them all

    # A trainer rank killed after step 1's checkpoint (two steps left, so the kill lands while the ranks still
    # work): the task fails naming the rank and its retry resumes from the newest checkpoint.
    killed = []
    watcher = _kill_when(rank_killed, "step_000001", "TrainerRank", killed)
    second = train_flow(**common, root=str(rank_killed))
    watcher.join()
    assert killed, "no trainer rank was found to kill"
    assert killed[0] != "step_000003", "the rank was killed after the last step: nothing was left to fail"
    assert second.resumed_from is not None and second.resumed_from.name == killed[0]
    assert [int(row["step"]) for row in second.metrics] == [1, 2, 3]
    runs = prefect_api.read_flow_runs()
    run = next(r for r in runs if r.parameters.get("root") == str(rank_killed))
    logs = " ".join(log.message for log in prefect_api.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))))
    assert "TrainerRankFailed" in logs and "died during" in logs
    assert any(f"trainer rank {rank} of 2 died" in logs for rank in (0, 1)), logs[-2000:]
    checkpoints = sorted(p.name for p in (rank_killed / "runs" / "train" / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_000002", "step_000003"]  # no half-written one left behind

    expected, actual = _final_weights(engine_killed), _final_weights(rank_killed)
    assert expected.keys() == actual.keys()
    mismatched = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not mismatched, f"weights differ after the resume: {mismatched[:5]}"
    assert [r["reward"] for r in first.metrics] == [r["reward"] for r in second.metrics]
