"""dvc.yaml as users run it, in a temporary git + DVC project: `dvc repro` of every stage, no-op reruns,
exactly the affected stages after a parameter change, experiments, and push / pull through an S3
remote served by moto on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnrl.config import dump_config, resolve_config
from tests.conftest import PROJECT_ROOT, small_overrides

PROJECT_FILES = ("attnrl", "infra", "tasks", "flows", "dvc.yaml")
OUTPUTS = ("data/prepared", "models/init", "runs/eval-init", "runs/train", "runs/eval", "reports")
ALL_STAGES = {"prepare", "warmup", "evaluate_init", "train", "evaluate", "report"}


def _env(api_url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_API_URL": api_url, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "attnrl",
            "GIT_AUTHOR_EMAIL": "test@attnrl", "GIT_COMMITTER_NAME": "attnrl", "GIT_COMMITTER_EMAIL": "test@attnrl",
            **extra}


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def make_project(path: Path, env: dict[str, str]) -> Path:
    """A git + DVC project holding attnrl's code, dvc.yaml and a params.yaml with small settings."""
    path.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, path / name)
    config = resolve_config(preset="tiny", overrides=small_overrides())
    (path / "params.yaml").write_text(dump_config(config))
    (path / ".gitignore").write_text("__pycache__/\n/runs/data-checks/\n")
    run(["git", "init", "-q"], path, env)
    run(["dvc", "init", "-q"], path, env)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "project"], path, env)
    return path


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def tree_digest(root: Path, paths=OUTPUTS) -> dict[str, str]:
    digests = {}
    for name in paths:
        base = root / name
        for file in sorted(p for p in base.rglob("*") if p.is_file()):
            digests[str(file.relative_to(root))] = hashlib.md5(file.read_bytes()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def reproduced(prefect_api, tmp_path_factory):
    """A project after one full `dvc repro`, with dvc.lock committed."""
    env = _env(str(prefect_api.api_url))
    project = make_project(tmp_path_factory.mktemp("dvc") / "project", env)
    first = run(["dvc", "repro"], project, env)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "repro"], project, env)
    return project, env, first.stdout


def _copy(reproduced, tmp_path):
    project, env, _ = reproduced
    copy = tmp_path / "project"
    shutil.copytree(project, copy, symlinks=True)
    return copy, env


def test_repro_runs_every_stage_then_has_nothing_to_do(reproduced):
    project, env, first = reproduced
    assert ran_stages(first) == ALL_STAGES, first
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == ALL_STAGES
    assert lock["train"]["params"]["params.yaml"]["train"]["steps"] == 2
    assert all((project / name).exists() for name in OUTPUTS)

    second = run(["dvc", "repro"], project, env)
    assert ran_stages(second.stdout) == set() and "Data and pipelines are up to date" in second.stdout, second.stdout
    assert "up to date" in run(["dvc", "status"], project, env).stdout

    # Lineage: metrics and checkpoints name the commit, the MD5 of every input file (DVC's hash of that
    # file: its name in .dvc/cache) and the full resolved config.
    lineage = json.loads((project / "runs" / "eval" / "lineage.json").read_text())
    commit = run(["git", "rev-parse", "HEAD~1"], project, env).stdout.strip()  # HEAD is the commit after repro
    assert lineage["git"]["project"]["commit"] == commit and lineage["config"]["train"]["steps"] == 2
    inputs = lineage["inputs_md5"]
    assert any(k.startswith("runs/train/final/") for k in inputs) and any(k.startswith("data/prepared/eval/") for k in inputs)
    for path, md5 in inputs.items():
        assert (project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file(), path
    checkpoint = next((project / "runs" / "train" / "checkpoints").glob("step_*"))
    assert json.loads((checkpoint / "lineage.json").read_text())["config"]["algorithm"]

    # The plots dvc.yaml defines render from the versioned files.
    plots = run(["dvc", "plots", "show", "--json"], project, env)
    assert "reward" in plots.stdout and "mean_at_k" in plots.stdout


def test_changing_a_training_parameter_reruns_train_evaluate_and_report_only(reproduced, tmp_path):
    project, env = _copy(reproduced, tmp_path)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] = params["train"]["lr"] * 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = (project / "runs" / "train" / "final" / "model.safetensors").read_bytes()
    rerun = run(["dvc", "repro"], project, env)
    assert ran_stages(rerun.stdout) == {"train", "evaluate", "report"}, rerun.stdout
    # A new run from the start, not a resume of the other learning rate's checkpoint.
    assert (project / "runs" / "train" / "final" / "model.safetensors").read_bytes() != before
    assert "up to date" in run(["dvc", "status"], project, env).stdout


def test_experiments_with_two_values_of_a_parameter_are_listed_with_metrics(reproduced, tmp_path):
    project, env = _copy(reproduced, tmp_path)
    for lr in ("0.002", "0.0005"):
        run(["dvc", "exp", "run", "-S", f"train.lr={lr}", "-n", f"lr-{lr}"], project, env)
    shown = json.loads(run(["dvc", "exp", "show", "--json", "--no-pager"], project, env).stdout)
    experiments = {rev["name"]: rev for row in shown for exp in (row.get("experiments") or []) for rev in exp["revs"]}
    assert {"lr-0.002", "lr-0.0005"} <= set(experiments), list(experiments)
    for name, lr in (("lr-0.002", 0.002), ("lr-0.0005", 0.0005)):
        data = experiments[name]["data"]
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == lr
        average = data["metrics"]["runs/eval/metrics.json"]["data"]["average"]
        assert 0 <= average["mean_at_k"] <= 1


@pytest.fixture
def moto_s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield server, f"http://{host}:{port}"
    finally:
        server.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def test_push_then_pull_into_a_fresh_clone_restores_every_output_and_a_dead_endpoint_fails_clearly(
        reproduced, tmp_path, moto_s3, monkeypatch):
    import boto3

    server, endpoint = moto_s3
    project, env = _copy(reproduced, tmp_path)
    env = {**env, **S3_ENV, "AWS_MAX_ATTEMPTS": "1"}
    boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket="attnrl")
    run(["dvc", "remote", "add", "-d", "s3", "s3://attnrl/dvc"], project, env)
    run(["dvc", "remote", "modify", "s3", "endpointurl", endpoint], project, env)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "remote"], project, env)  # the remote (no credentials) is part of the project
    run(["dvc", "push"], project, env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    run(["dvc", "pull"], clone, env)
    assert tree_digest(clone) == tree_digest(project)

    # Artifacts read and written directly (boto3), as the evaluation of a remote checkpoint does.
    from infra.dvc_store import S3Artifacts, S3Location, VersioningError

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    store = S3Artifacts(S3Location.parse("s3://attnrl/artifacts", endpoint), attempts=1)
    final = project / "runs" / "train" / "final"
    assert store.upload_dir(final, "final") == len([p for p in final.rglob("*") if p.is_file()])
    store.download_dir("final", tmp_path / "downloaded")
    assert tree_digest(tmp_path / "downloaded", ["."]) == tree_digest(final, ["."])

    # The endpoint goes away: push fails naming it, and the local cache is what it was.
    cache_before = tree_digest(project, [".dvc/cache"])
    server.stop()
    failed = run(["dvc", "push"], project, env, check=False)
    assert failed.returncode != 0
    assert "Could not connect" in failed.stderr + failed.stdout or "failed to push" in failed.stderr + failed.stdout
    assert tree_digest(project, [".dvc/cache"]) == cache_before
    with pytest.raises(VersioningError, match=r"s3://attnrl/artifacts/final/.*endpoint http://127\.0\.0\.1"):
        store.download_dir("final", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def test_after_the_prefect_pipeline_dvc_status_is_clean_and_every_stage_is_pushed(
        prefect_api, tmp_path, moto_s3, monkeypatch):
    import boto3

    from flows.pipeline import pipeline

    _, endpoint = moto_s3
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    env = _env(str(prefect_api.api_url))
    project = make_project(tmp_path / "project", env)
    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    s3.create_bucket(Bucket="attnrl")
    run(["dvc", "remote", "add", "-d", "s3", "s3://attnrl/dvc"], project, env)
    run(["dvc", "remote", "modify", "s3", "endpointurl", endpoint], project, env)

    state = pipeline(config_path=str(project / "params.yaml"), root=str(project), return_state=True)
    assert state.is_completed(), state.message
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == ALL_STAGES
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project, env).stdout
    repro = run(["dvc", "repro"], project, env)
    assert ran_stages(repro.stdout) == set() and "Data and pipelines are up to date" in repro.stdout, repro.stdout
    # Pushed as each stage finished: the remote has every cached object.
    assert "are in sync" in run(["dvc", "status", "--cloud"], project, env).stdout
    assert s3.list_objects_v2(Bucket="attnrl", Prefix="dvc/")["KeyCount"] > 0
