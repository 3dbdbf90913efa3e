"""A train flow killed mid-run and run again resumes from its newest checkpoint and ends with exactly the
weights of a run that was never interrupted (docs/architecture.md "Resumable")."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from flows.stages import prepare_flow, train_flow, warmup_flow
from tests.conftest import PROJECT_ROOT, small_overrides

CONFIG = str(PROJECT_ROOT / "params.yaml")
OVERRIDES = [*small_overrides(), "train.steps=4", "train.save_every=1", "train.keep_checkpoints=2"]
KILL_AFTER = "step_000002"


def _final_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "runs" / "train" / "final" / "model.safetensors"))


def _train_in_subprocess_until(root: Path, checkpoint: str, api_url: str) -> None:
    """Start ``attnrl train`` (the train flow) and SIGKILL it as soon as ``checkpoint`` is the newest."""
    sets = [arg for override in OVERRIDES for arg in ("--set", override)]
    env = {**os.environ, "PREFECT_API_URL": api_url}
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "train", "--config", CONFIG, "--root", str(root), *sets],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    latest = root / "runs" / "train" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    try:
        while not (latest.is_file() and latest.read_text().strip() == checkpoint):
            if process.poll() is not None:
                raise AssertionError(f"train exited ({process.returncode}) before {checkpoint}: "
                                     f"{process.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {checkpoint} within 300 s")
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the whole group: no clean shutdown of anything
        process.wait()
        process.stderr.close()


def test_a_killed_train_flow_resumes_and_matches_an_uninterrupted_run(prefect_api, tmp_path):
    interrupted, uninterrupted = tmp_path / "interrupted", tmp_path / "uninterrupted"
    common = {"config_path": CONFIG, "overrides": OVERRIDES}
    prepare_flow(**common, root=str(interrupted))
    warmup_flow(**common, root=str(interrupted))
    shutil.copytree(interrupted, uninterrupted)

    reference = train_flow(**common, root=str(uninterrupted))
    assert reference.resumed_from is None and len(reference.metrics) == 4

    _train_in_subprocess_until(interrupted, KILL_AFTER, str(prefect_api.api_url))
    assert not (interrupted / "runs" / "train" / "final").exists()  # it really stopped mid-run

    resumed = train_flow(**common, root=str(interrupted))
    assert resumed.resumed_from is not None and resumed.resumed_from.name >= KILL_AFTER
    assert resumed.resumed_from.name < "step_000004"
    assert [int(row["step"]) for row in resumed.metrics] == [1, 2, 3, 4]

    expected, actual = _final_weights(uninterrupted), _final_weights(interrupted)
    assert expected.keys() == actual.keys()
    mismatched = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not mismatched, f"weights differ after resume: {mismatched[:5]}"
    same_reward = [round(a["reward"], 6) == round(b["reward"], 6) for a, b in zip(reference.metrics, resumed.metrics)]
    assert all(same_reward), (reference.metrics, resumed.metrics)
