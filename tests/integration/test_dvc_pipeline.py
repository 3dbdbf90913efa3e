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

import pyarrow.parquet as pq
import pytest
import yaml
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId

from attnrl.config import dump_config, resolve_config
from attnrl.data.loaders import load_verl_parquet
from tests.conftest import PROJECT_ROOT, small_overrides

PROJECT_FILES = ("attnrl", "infra", "tasks", "flows", "benchmarks/results", "dvc.yaml", ".dvcignore")
OUTPUTS = ("data/prepared", "data/difficulty", "models/init", "runs/eval-init", "runs/train", "runs/eval", "reports")
ALL_STAGES = {"prepare", "warmup", "difficulty", "evaluate_init", "train", "evaluate", "report"}


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

    # The plots dvc.yaml defines render from the versioned files: DVCLive's per-step logs of training (one
    # point per step of metrics.jsonl) and the evaluation; `dvc metrics show` has DVCLive's summaries.
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project, env).stdout)["data"]
    reward = [entry for name, entries in plots.items() if name.endswith("dvclive/plots/metrics/reward.tsv")
              for entry in entries]
    assert reward, list(plots)
    rows = [json.loads(line) for line in (project / "runs" / "train" / "metrics.jsonl").read_text().splitlines()]
    points = [(float(d["step"]), float(d["reward"])) for d in reward[0]["content"]["data"]["values"]]
    assert points == [(row["step"], row["reward"]) for row in rows]
    assert any("mean_at_k" in name or "mean_at_k" in json.dumps(entries) for name, entries in plots.items())
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project, env).stdout)
    metrics = next(iter(shown.values()))["data"]
    assert metrics["runs/train/dvclive/metrics.json"]["data"]["step"] == rows[-1]["step"]
    summary = json.loads((project / "runs" / "eval" / "metrics.json").read_text())
    assert metrics["runs/eval/dvclive/metrics.json"]["data"]["average"] == summary["average"]


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


def test_a_code_change_starts_training_over_and_without_one_a_rerun_resumes_with_nothing_to_train(
        reproduced, tmp_path):
    project, env = _copy(reproduced, tmp_path)
    env = {**env, "PYTHONPATH": str(project)}  # the copy's code runs, not this checkout's editable install
    final = project / "runs" / "train" / "final" / "model.safetensors"
    before = final.read_bytes()
    # No change: a forced rerun of train resumes the finished checkpoint and trains nothing.
    same = run(["dvc", "repro", "--force", "--single-item", "train"], project, env)
    assert "(resumed from" in same.stdout and "starting a new run" not in same.stderr, same.stdout + same.stderr
    assert final.read_bytes() == before
    # A one-line change of the loss: of every stage, dvc sees train's code changed, and train reruns from the
    # start instead of resuming. (Run up to train, its target: the stages after it rerun because their input
    # changed, as the training-parameter test shows.)
    loss = project / "attnrl" / "loss.py"
    loss.write_text(loss.read_text().replace("unclipped = -advantages * ratio", "unclipped = -2.0 * advantages * ratio"))
    stale = json.loads(run(["dvc", "status", "--json"], project, env).stdout)  # report reads all of attnrl too
    assert set(stale) == {"train", "report"} and stale["train"] == [{"changed deps": {"attnrl": "modified"}}], stale
    changed = run(["dvc", "repro", "train"], project, env)
    assert ran_stages(changed.stdout) == {"train"}, changed.stdout
    assert "trained with a different code (code_md5); starting a new run" in changed.stderr, changed.stderr[-2000:]
    assert "(resumed from" not in changed.stdout
    assert final.read_bytes() != before


def test_an_override_train_run_writes_to_its_own_root_and_leaves_the_versioned_outputs_byte_identical(
        reproduced, tmp_path):
    project, env = _copy(reproduced, tmp_path)
    versioned = tree_digest(project)
    first = run(["attnrl", "train", "--set", "train.lr=0.002"], project, env)
    assert tree_digest(project) == versioned  # runs/train and every other versioned output untouched
    [own] = (project / "runs" / "overrides").iterdir()
    assert (own / "runs" / "train" / "final" / "model.safetensors").is_file(), first.stdout
    assert (own / "models" / "init").resolve() == (project / "models" / "init").resolve()  # versioned input
    assert "(resumed from" not in first.stdout
    # The same overrides again: the same root, where the run resumes its own finished checkpoint.
    again = run(["attnrl", "train", "--set", "train.lr=0.002"], project, env)
    assert "(resumed from" in again.stdout, again.stdout
    assert [p.name for p in (project / "runs" / "overrides").iterdir()] == [own.name]
    assert tree_digest(project) == versioned
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project, env).stdout


def test_an_experiment_that_turns_the_difficulty_stage_on_trains_on_the_problems_it_kept(reproduced, tmp_path):
    project, env = _copy(reproduced, tmp_path)
    # A policy warmed up on level 1 long enough to solve some problems and not others (as in
    # tests/unit/stages/test_stages.py), so the stage keeps some.
    sets = ["difficulty.enabled=true", "difficulty.samples_per_problem=4", "data.synthetic.levels=[1]",
            "data.synthetic.train_per_level=90", "warmup.steps=400", "warmup.batch_size=16", "warmup.lr=3e-3",
            "rollout.sampling.max_new_tokens=12"]
    # Up to the train stage (its target): what this test checks is what train reads; the stages after it are
    # the other tests' subject.
    done = run(["dvc", "exp", "run", "-n", "with-difficulty", *(a for s in sets for a in ("-S", s)), "train"],
               project, env)
    assert {"difficulty", "train"} <= ran_stages(done.stdout), done.stdout
    table = pq.read_table(project / "data" / "difficulty" / "difficulty.parquet").to_pylist()
    kept = [(row["source"], row["problem_id"]) for row in table if row["kept"]]
    estimated = len(load_verl_parquet(project / "data" / "prepared" / "train.parquet"))
    assert len(table) == estimated and 0 < len(kept) < estimated
    trained_on = project / "data" / "difficulty" / "train.parquet"
    assert [(p.source, p.id) for p in load_verl_parquet(trained_on)] == kept
    inputs = json.loads((project / "runs" / "train" / "lineage.json").read_text())["inputs_md5"]
    assert "data/difficulty/train.parquet" in inputs and "data/prepared/train.parquet" not in inputs


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


def test_a_nightly_run_records_and_pushes_every_stage_and_is_an_experiment_that_a_fresh_clone_pulls(
        prefect_api, tmp_path, moto_s3, monkeypatch):
    """What pipeline-nightly runs, on a new project: every stage recorded with DVC and pushed to the store as it
    finished, the run saved as an experiment that a fresh clone pulls; a dead endpoint fails clearly."""
    import boto3

    server, endpoint = moto_s3
    env = _env(str(prefect_api.api_url))
    project = make_project(tmp_path / "project", env)
    origin = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path, env)
    run(["git", "remote", "add", "origin", str(origin)], project, env)
    run(["git", "push", "-q", "origin", "HEAD"], project, env)
    # The store comes from the environment, as on a deployment's worker; credentials as AWS_* variables.
    env = {**env, **S3_ENV, "AWS_MAX_ATTEMPTS": "1", "ATTNRL_DVC_REMOTE": "s3://attnrl/dvc",
           "ATTNRL_DVC_REMOTE_ENDPOINT": endpoint}
    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    s3.create_bucket(Bucket="attnrl")
    run(["attnrl", "pipeline", "--experiment", "nightly"], project, env)  # what pipeline-nightly runs
    # Every stage recorded as it finished: dvc.lock has them all, and neither repro nor push has anything to do.
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == ALL_STAGES
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project, env).stdout
    repro = run(["dvc", "repro"], project, env)
    assert ran_stages(repro.stdout) == set() and "Data and pipelines are up to date" in repro.stdout, repro.stdout
    assert "are in sync" in run(["dvc", "status", "--cloud"], project, env).stdout
    assert s3.list_objects_v2(Bucket="attnrl", Prefix="dvc/")["KeyCount"] > 0
    [ref] = run(["git", "ls-remote", str(origin), "refs/exps/*"], tmp_path, env).stdout.splitlines()
    name = ref.rsplit("/", 1)[1]
    assert name.startswith("nightly-"), ref

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    run(["attnrl", "remote"], clone, env)
    run(["dvc", "exp", "pull", "origin", name], clone, env)
    shown = json.loads(run(["dvc", "exp", "show", "--json", "--no-pager"], clone, env).stdout)
    experiments = {rev["name"]: rev for row in shown for exp in (row.get("experiments") or []) for rev in exp["revs"]}
    assert name in experiments, list(experiments)
    metrics = experiments[name]["data"]["metrics"]  # DVCLive's summaries: evaluation and the last training step
    assert metrics["runs/eval/dvclive/metrics.json"]["data"]["average"] == json.loads(
        (project / "runs" / "eval" / "metrics.json").read_text())["average"]
    assert metrics["runs/train/dvclive/metrics.json"]["data"] == json.loads(
        (project / "runs" / "train" / "dvclive" / "metrics.json").read_text())
    run(["dvc", "exp", "apply", name], clone, env)
    assert tree_digest(clone) == tree_digest(project)  # every versioned output, from S3

    # The endpoint goes away: a push fails, the stage's push naming the stage and the error, and the local cache
    # is what it was.
    from infra.dvc_store import VersioningError, push_stage

    cache_before = tree_digest(project, [".dvc/cache"])
    server.stop()
    failed = run(["dvc", "push"], project, env, check=False)
    assert failed.returncode != 0
    assert "Could not connect" in failed.stderr + failed.stdout or "failed to push" in failed.stderr + failed.stdout
    for key in (*S3_ENV, "AWS_MAX_ATTEMPTS"):
        monkeypatch.setenv(key, env[key])
    with pytest.raises(VersioningError, match=r"dvc push train to remote 'default' failed: (.|\n)*(Could not connect|"
                                              r"failed to push)"):
        push_stage(project, "train")
    assert tree_digest(project, [".dvc/cache"]) == cache_before


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def test_a_run_pushes_to_the_projects_default_remote_and_the_environments_remote_takes_precedence(
        prefect_api, tmp_path, monkeypatch):
    """Which store a recording run pushes to (``StageRecorder``): the project's default DVC remote; with
    $ATTNRL_DVC_REMOTE set, that store, made the default in .dvc/config.local (git ignores it), so a worker and
    a laptop can point one project at different stores. (The nightly test above pushes through the latter.)"""
    from tasks.versioning import StageRecorder

    env = _env(str(prefect_api.api_url))
    project = make_project(tmp_path / "project", env)
    config, params = resolve_config(path=project / "params.yaml"), str(project / "params.yaml")
    monkeypatch.delenv("ATTNRL_DVC_REMOTE", raising=False)
    assert StageRecorder.for_run(project, config, params, None, None).remote is None
    run(["dvc", "remote", "add", "-d", "team", "s3://team-store/dvc"], project, env)
    recorder = StageRecorder.for_run(project, config, params, None, None)
    assert (recorder.remote, recorder.stages) == ("team", ALL_STAGES)

    monkeypatch.setenv("ATTNRL_DVC_REMOTE", "s3://worker-store/dvc")
    monkeypatch.setenv("ATTNRL_DVC_REMOTE_ENDPOINT", "http://127.0.0.1:9")
    assert StageRecorder.for_run(project, config, params, None, None).remote == "env"
    local = (project / ".dvc" / "config.local").read_text()
    assert "s3://worker-store/dvc" in local and "http://127.0.0.1:9" in local
    assert run(["dvc", "remote", "default"], project, env).stdout.strip() == "env"
    assert "config.local" not in run(["git", "status", "--porcelain"], project, env).stdout


def test_a_params_edit_during_a_pipeline_run_changes_none_of_its_stages_and_is_not_recorded(
        prefect_api, tmp_path, monkeypatch):
    import flows.pipeline as pipeline_module

    env = _env(str(prefect_api.api_url))
    project = make_project(tmp_path / "project", env)
    params = project / "params.yaml"
    first = resolve_config(path=params)
    edited = resolve_config(path=params, overrides=["train.lr=0.5", "eval.max_new_tokens=3"])
    real_warmup = pipeline_module.warmup_flow

    def warmup_then_edit(**kwargs):  # a colleague edits params.yaml while the run is between stages
        result = real_warmup(**kwargs)
        params.write_text(dump_config(edited))
        return result

    monkeypatch.setattr(pipeline_module, "warmup_flow", warmup_then_edit)
    state = pipeline_module.pipeline(config_path=str(params), root=str(project), return_state=True)
    assert state.is_completed(), state.message

    # Every stage after the edit ran with the run's first configuration ...
    trained = json.loads((project / "runs" / "train" / "lineage.json").read_text())["config"]
    assert trained == first.model_dump(mode="json")
    parent = prefect_api.read_flow_run(state.state_details.flow_run_id)
    subflows = prefect_api.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
    assert len(subflows) == 7
    # ... and the UI shows it among each stage's parameters.
    assert all(run.parameters["config"]["train"]["lr"] == first.train.lr for run in subflows)
    # Recorded with DVC: prepare, before the edit; nothing after it, with a warning that says why.
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == {"prepare"}
    logs = " ".join(log.message for log in prefect_api.read_logs(
        LogFilter(flow_run_id=LogFilterFlowRunId(any_=[parent.id]))))
    assert "not recording warmup or any later stage with DVC" in logs, logs[-2000:]
    assert "changed during this run (eval.max_new_tokens, train.lr)" in logs
