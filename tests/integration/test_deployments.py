"""prefect.yaml against a real, separate Prefect server: `prefect deploy --all` registers the deployments with
their schedules, and a real process worker runs one of them to completion.

The server here is its own `prefect server start` process (not the session's test harness) with its own
PREFECT_HOME, hence a fresh SQLite database; it and the worker are stopped in teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import PROJECT_ROOT, small_overrides

pytestmark = pytest.mark.integration

PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "attnrl-process"
SCHEDULED = {("pipeline", "pipeline-nightly"): "0 2 * * *", ("evaluate-latest", "evaluate-latest"): "0 */6 * * *"}
ON_DEMAND = {("train", "train-on-demand"), ("train", "train-on-ray-cluster"), ("prepare", "prepare-on-demand")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Terminate the process group (the server and worker start children), then kill what is left."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([PREFECT, "--no-prompt", *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free 127.0.0.1 port with a fresh PREFECT_HOME; yields (api_url, env)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PWD": str(PROJECT_ROOT),  # prefect.yaml's pull step: {{ $PWD }} is the directory deploy runs in
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    })
    log = (home / "server.log").open("w")
    # No scheduler: the scheduled deployments must not get runs that the run-once worker could pick up.
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-scheduler", "--no-ui"],
        cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (home / "server.log").read_text()
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server did not become healthy in 90 s"
            time.sleep(0.5)
        _cli(env, "work-pool", "create", POOL, "--type", "process")
        _cli(env, "deploy", "--all", timeout=180)
        yield api_url, env
    finally:
        _stop(server)
        log.close()


def _deployments(api_url: str) -> dict[tuple[str, str], dict]:
    flows = {f["id"]: f["name"] for f in httpx.post(f"{api_url}/flows/filter", json={}).json()}
    return {(flows[d["flow_id"]], d["name"]): d for d in httpx.post(f"{api_url}/deployments/filter", json={}).json()}


def test_deploy_registers_the_scheduled_and_on_demand_deployments(prefect_server):
    api_url, _ = prefect_server
    deployments = _deployments(api_url)
    assert set(deployments) == set(SCHEDULED) | ON_DEMAND
    for key, cron in SCHEDULED.items():
        schedules = deployments[key]["schedules"]
        assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in schedules] == [(cron, "UTC", True)]
    for key in ON_DEMAND:
        assert deployments[key]["schedules"] == []
    for deployment in deployments.values():
        assert deployment["work_pool_name"] == POOL
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_ROOT)}}
        ]
    assert deployments[("pipeline", "pipeline-nightly")]["entrypoint"] == "flows/pipeline.py:pipeline"
    assert deployments[("evaluate-latest", "evaluate-latest")]["entrypoint"] == "flows/evaluate_latest.py:evaluate_latest"
    # The cluster run: its driver finds the Ray cluster through the job variable, its layout in the overrides.
    cluster = deployments[("train", "train-on-ray-cluster")]
    assert cluster["job_variables"]["env"] == {"RAY_ADDRESS": "auto"}
    assert "distributed.enabled=true" in cluster["parameters"]["overrides"]
    pool = httpx.get(f"{api_url}/work_pools/{POOL}").json()
    assert pool["type"] == "process"


def test_a_process_worker_runs_a_deployment_to_completion(prefect_server, tmp_path):
    api_url, env = prefect_server
    deployment = _deployments(api_url)[("prepare", "prepare-on-demand")]
    # No config_path: the default "params.yaml" resolves only if the pull step moved the run into the project.
    parameters = {"overrides": small_overrides(), "root": str(tmp_path)}
    response = httpx.post(f"{api_url}/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters})
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]

    log = tmp_path / "worker.log"
    elsewhere = tmp_path / "worker-cwd"  # not the project directory
    elsewhere.mkdir()
    with log.open("w") as out:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--run-once"], cwd=elsewhere,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                state = httpx.get(f"{api_url}/flow_runs/{run_id}").json()["state"]
                if state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                    break
                assert time.monotonic() < deadline, f"flow run still {state['type']}:\n{log.read_text()}"
                time.sleep(1)
            worker.wait(timeout=60)  # --run-once: the worker exits after its one poll's runs end
        finally:
            _stop(worker)
    assert state["type"] == "COMPLETED", f"{state}\n{log.read_text()}"
    assert worker.returncode == 0, log.read_text()
    assert (tmp_path / "data" / "prepared" / "train.parquet").is_file()
    assert (tmp_path / "data" / "prepared" / "eval" / "synthetic.parquet").is_file()
    assert not (elsewhere / "data").exists() and not (elsewhere / "params.yaml").exists()
