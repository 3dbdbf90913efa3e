"""prefect.yaml against a real, separate Prefect server: `prefect deploy --all` registers the deployments with
their schedules, concurrency limits and triggers; a real process worker runs them; two pipeline runs started
at once take turns; a completed train run is evaluated; a failing run fires the failure alert at a webhook
receiver on 127.0.0.1; a cancelled run stops, frees its workspace and the next run resumes.

The server here is its own `prefect server start` process (not the session's test harness) with its own
PREFECT_HOME, hence a fresh SQLite database; it and the worker are stopped in teardown.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
from prefect.client.base import PrefectHttpxSyncClient

from attnrl.config import resolve_config
from attnrl.training.checkpoint import latest_checkpoint
from flows.workspace import isolated_root, lock_name
from tests.conftest import PROJECT_ROOT, locked_project, small_overrides

pytestmark = pytest.mark.integration

PREFECT = str(Path(sys.executable).with_name("prefect"))
ATTNRL = str(Path(sys.executable).with_name("attnrl"))
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
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
    """A real `prefect server start` on a free 127.0.0.1 port with a fresh PREFECT_HOME; yields (api, env).

    `api` is Prefect's own HTTP client on the server's API URL: it raises on an error status and retries what
    the server marks retryable (503 while SQLite is briefly locked by the server's own services, 429, 502),
    as every Prefect client and worker does. A bare httpx call fails the test on the first 503.
    """
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
        # Quick turns: a run waiting for its deployment's slot retries every 2 s, a worker polls every 2 s.
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
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
        with PrefectHttpxSyncClient(base_url=api_url, timeout=30) as api:
            yield api, env
    finally:
        _stop(server)
        log.close()


def _deployments(api: PrefectHttpxSyncClient) -> dict[tuple[str, str], dict]:
    flows = {f["id"]: f["name"] for f in api.post("/flows/filter", json={}).json()}
    return {(flows[d["flow_id"]], d["name"]): d for d in api.post("/deployments/filter", json={}).json()}


def test_deploy_registers_the_scheduled_and_on_demand_deployments(prefect_server):
    api, _ = prefect_server
    deployments = _deployments(api)
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
    for deployment in deployments.values():  # every preset run's configuration resolves (the layout rules included)
        resolve_config(path=PROJECT_ROOT / "params.yaml", overrides=deployment["parameters"].get("overrides", []))
    pool = api.get(f"/work_pools/{POOL}").json()
    assert pool["type"] == "process"
    # One run at a time of the pipeline, of evaluate-latest and of on-demand training; later ones wait.
    for key in (("pipeline", "pipeline-nightly"), ("evaluate-latest", "evaluate-latest"), ("train", "train-on-demand")):
        assert deployments[key]["global_concurrency_limit"]["limit"] == 1, deployments[key]
        assert deployments[key]["concurrency_options"]["collision_strategy"] == "ENQUEUE", key
    # evaluate-latest's trigger: a completed run of a train deployment, whose id it is given.
    [trigger] = [a for a in api.post("/automations/filter", json={}).json()
                 if a["actions"][0]["type"] == "run-deployment"
                 and a["actions"][0]["deployment_id"] == deployments[("evaluate-latest", "evaluate-latest")]["id"]]
    assert trigger["trigger"]["expect"] == ["prefect.flow-run.Completed"]
    assert trigger["trigger"]["match_related"]["prefect.resource.name"] == ["train-on-demand", "train-on-ray-cluster"]
    assert trigger["actions"][0]["parameters"] == {"train_flow_run": "{{ event.resource.id }}"}


def test_a_process_worker_runs_a_deployment_to_completion(prefect_server, tmp_path):
    api, env = prefect_server
    # No config_path: the default "params.yaml" resolves only if the pull step moved the run into the project.
    parameters = {"overrides": small_overrides(), "root": str(tmp_path)}
    run_id = _start_run(api, ("prepare", "prepare-on-demand"), parameters)

    log = tmp_path / "worker.log"
    elsewhere = tmp_path / "worker-cwd"  # not the project directory
    elsewhere.mkdir()
    with log.open("w") as out:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--run-once"], cwd=elsewhere,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            state = _wait(api, run_id, log, 120)["state"]
            worker.wait(timeout=60)  # --run-once: the worker exits after its one poll's runs end
        finally:
            _stop(worker)
    assert state["type"] == "COMPLETED", f"{state}\n{log.read_text()}"
    assert worker.returncode == 0, log.read_text()
    assert (tmp_path / "data" / "prepared" / "train.parquet").is_file()
    assert (tmp_path / "data" / "prepared" / "eval" / "synthetic.parquet").is_file()
    assert not (elsewhere / "data").exists() and not (elsewhere / "params.yaml").exists()


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """A webhook receiver on a free 127.0.0.1 port: yields its URL and the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/attnrl-alerts", received
    finally:
        server.shutdown()
        server.server_close()


def _start_run(api: PrefectHttpxSyncClient, deployment: tuple[str, str], parameters: dict) -> str:
    deployment_id = _deployments(api)[deployment]["id"]
    response = api.post(f"/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _run(api: PrefectHttpxSyncClient, run_id: str) -> dict:
    return api.get(f"/flow_runs/{run_id}").json()


def _wait(api: PrefectHttpxSyncClient, run_id: str, log: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (run := _run(api, run_id))["state"]["type"] not in TERMINAL:
        assert time.monotonic() < deadline, f"flow run {run['name']} still {run['state']['type']}:\n{log.read_text()}"
        time.sleep(1)
    return run


def _worker(env: dict[str, str], log: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, *extra], cwd=cwd, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _files(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_two_pipeline_runs_at_once_take_turns_and_a_completed_train_run_is_evaluated(prefect_server, tmp_path):
    api, env = prefect_server
    root = tmp_path / "work"
    parameters = {"overrides": small_overrides(), "root": str(root)}
    runs = [_start_run(api, ("pipeline", "pipeline-nightly"), parameters) for _ in range(2)]
    log = tmp_path / "worker.log"
    worker = _worker(env, log, tmp_path)
    try:
        # Whichever got the deployment's one slot finishes first; its checkpoints are noted then.
        deadline = time.monotonic() + 600
        while not any(_run(api, run)["state"]["type"] in TERMINAL for run in runs):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        first, second = sorted(runs, key=lambda run: _run(api, run)["state"]["type"] not in TERMINAL)
        done = _run(api, first)
        assert done["state"]["type"] == "COMPLETED", f"{done['state']}\n{log.read_text()}"
        checkpoints = _files(root / "runs" / "train" / "checkpoints")
        assert checkpoints
        other = _wait(api, second, log, 600)
        assert other["state"]["type"] == "COMPLETED", f"{other['state']}\n{log.read_text()}"
        # The other waited for the first (the deployment's limit of one run), then resumed its finished
        # training instead of deleting it: every checkpoint file of the first run is still there, unchanged.
        history = [s["name"] for s in api.get("/flow_run_states/", params={"flow_run_id": second}).json()]
        assert "AwaitingConcurrencySlot" in history, history
        assert other["start_time"] >= done["end_time"], (done["end_time"], other["start_time"])
        after = _files(root / "runs" / "train" / "checkpoints")
        assert {name: after.get(name) for name in checkpoints} == checkpoints

        # A completed train deployment run triggers evaluate-latest on the policy that run trained.
        train = _start_run(api, ("train", "train-on-demand"), parameters)
        trained = _wait(api, train, log, 300)
        assert trained["state"]["type"] == "COMPLETED", f"{trained['state']}\n{log.read_text()}"
        deadline = time.monotonic() + 120
        while True:
            runs = api.post("/flow_runs/filter", json={
                "deployments": {"id": {"any_": [_deployments(api)[("evaluate-latest", "evaluate-latest")]["id"]]}},
            }).json()
            if runs:
                break
            assert time.monotonic() < deadline, f"no evaluate-latest run after train run {train} completed"
            time.sleep(1)
        [evaluation] = runs
        assert evaluation["parameters"] == {"train_flow_run": f"prefect.flow-run.{train}"}
        evaluated = _wait(api, evaluation["id"], log, 300)
        assert evaluated["state"]["type"] == "COMPLETED", f"{evaluated['state']}\n{log.read_text()}"
        assert json.loads((root / "runs" / "eval-latest" / "metrics.json").read_text())["average"]
    finally:
        _stop(worker)


def test_a_failing_deployment_run_fires_the_failure_alert_at_a_webhook(prefect_server, tmp_path, webhook):
    api, env = prefect_server
    url, received = webhook
    for _ in range(2):  # a second time updates the automation in place
        done = subprocess.run([ATTNRL, "alerts", "--webhook", url], cwd=PROJECT_ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    automations = api.post("/automations/filter", json={}).json()
    assert [a["name"] for a in automations].count("attnrl: deployment run failed") == 1
    # A nightly run whose configuration is invalid fails in its first task.
    bad = {"overrides": [*small_overrides(), "train.lr=-1"], "root": str(tmp_path / "work")}
    run_id = _start_run(api, ("pipeline", "pipeline-nightly"), bad)
    log = tmp_path / "worker.log"
    worker = _worker(env, log, tmp_path, "--run-once")
    try:
        failed = _wait(api, run_id, log, 180)
        worker.wait(timeout=60)
    finally:
        _stop(worker)
    assert failed["state"]["type"] == "FAILED", failed["state"]
    deadline = time.monotonic() + 90
    while not received:
        assert time.monotonic() < deadline, "the failure alert never reached the webhook"
        time.sleep(0.5)
    [alert] = received
    assert alert["source"] == "attnrl"
    assert alert["subject"] == f"attnrl: pipeline run {failed['name']} is Failed", alert
    assert "pipeline-nightly" in alert["body"] and run_id in alert["body"] and "train.lr" in alert["body"], alert


def test_a_cancelled_deployment_run_stops_frees_its_workspace_and_the_next_run_resumes(prefect_server, tmp_path):
    """What the UI's Cancel does (`prefect flow-run cancel`): the run goes Cancelling, the worker terminates its
    process; it must stop within 20 s, end Cancelled, free the workspace lock, and a later run of the same
    deployment with the same parameters resume from the newest checkpoint."""
    api, env = prefect_server
    root = locked_project(tmp_path / "project")
    overrides = [*small_overrides(), "train.steps=20", "train.save_every=1"]
    parameters = {"config_path": str(root / "params.yaml"), "overrides": overrides, "root": str(root)}
    own = isolated_root(root, resolve_config(path=root / "params.yaml", overrides=overrides))
    checkpoints = own / "runs" / "train" / "checkpoints"
    log = tmp_path / "worker.log"
    first = _start_run(api, ("train", "train-on-demand"), parameters)
    worker = _worker(env, log, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while latest_checkpoint(checkpoints) is None:
            assert _run(api, first)["state"]["type"] not in TERMINAL, log.read_text()
            assert time.monotonic() < deadline, f"no checkpoint in 300 s\n{log.read_text()}"
            time.sleep(0.2)
        asked = time.monotonic()
        response = api.post(f"/flow_runs/{first}/set_state", json={"state": {"type": "CANCELLING"}, "force": True})
        assert response.status_code in (200, 201), response.text
        cancelled = _wait(api, first, log, 60)
        took = time.monotonic() - asked
        assert cancelled["state"]["type"] == "CANCELLED", f"{cancelled['state']}\n{log.read_text()}"
        assert took <= 20, f"cancelled after {took:.0f}s\n{log.read_text()}"
        newest = latest_checkpoint(checkpoints)
        assert newest is not None and newest.name != "step_000020"
        assert api.get(f"/v2/concurrency_limits/{lock_name(own)}").json()["active_slots"] == 0

        second = _start_run(api, ("train", "train-on-demand"), parameters)
        done = _wait(api, second, log, 300)
        assert done["state"]["type"] == "COMPLETED", f"{done['state']}\n{log.read_text()}"
    finally:
        _stop(worker)
    logs = [entry["message"] for entry in api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [second]}}}).json()]
    assert any(message.startswith(f"resuming from {newest} ") for message in logs), logs
    assert latest_checkpoint(checkpoints).name == "step_000020"
