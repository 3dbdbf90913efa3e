"""The ``attnrl`` command as a user runs it: the demo (the pipeline flow) end to end, and clear errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from prefect.client.schemas.sorting import FlowRunSort

from flows.cli import main
from tests.conftest import PROJECT_ROOT, small_overrides


def _sets(overrides):
    return [arg for override in overrides for arg in ("--set", override)]


def test_demo_runs_every_stage_and_prints_accuracy_per_level(prefect_api, tmp_path, capsys):
    code = main(["demo", "--config", str(PROJECT_ROOT / "params.yaml"), "--root", str(tmp_path), *_sets(small_overrides())])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "synthetic-L1" in out and "synthetic-L2" in out and "average" in out
    # Accuracy before and after RL, per level, and one line per training step.
    assert "before" in out and "after" in out and "training: 2 steps, reward" in out
    assert f"report: {(tmp_path / 'reports' / 'report.html').resolve()}" in out and "Prefect run: " in out
    assert (tmp_path / "runs" / "eval-init" / "metrics.json").is_file()
    assert len((tmp_path / "runs" / "train" / "metrics.jsonl").read_text().splitlines()) == 2
    report = (tmp_path / "reports" / "report.html").read_text()
    assert "synthetic-L2" in report and 'src="training_curves.png"' in report and 'src="evaluation.png"' in report
    assert (tmp_path / "reports" / "training_curves.png").stat().st_size > 0
    metrics = json.loads((tmp_path / "runs" / "eval" / "metrics.json").read_text())
    assert [b["benchmark"] for b in metrics["benchmarks"]] == ["synthetic-L1", "synthetic-L2"]
    assert (tmp_path / "models" / "init" / "model.safetensors").is_file()


def test_unknown_config_key_fails_with_the_key_named(prefect_api, tmp_path, capsys):
    code = main(["prepare", "--config", str(PROJECT_ROOT / "params.yaml"), "--root", str(tmp_path), "--set", "data.shuffle=true"])
    assert code == 2
    assert "data.shuffle: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_a_bad_set_fails_in_one_line_before_any_prefect_api_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", "--config", str(PROJECT_ROOT / "params.yaml"),
                           "--root", str(tmp_path), "--set", "data.eval.0.k=0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"attnrl evaluate: error: invalid configuration in "
                                        f"{PROJECT_ROOT / 'params.yaml'}: data.eval.0.k: Input should be greater "
                                        f"than or equal to 1 (got 0)"], done.stderr
    assert not list(tmp_path.iterdir())  # no run, no temporary API's files


def test_missing_model_path_fails_clearly(prefect_api, tmp_path, capsys):
    code = main(["evaluate", "--config", str(PROJECT_ROOT / "params.yaml"), "--root", str(tmp_path),
                 "--model", str(tmp_path / "no-such-model")])
    assert code == 2
    assert "model path does not exist" in capsys.readouterr().err


BROKEN_LAYOUTS = [  # over the paper's preset: engines vs ranks, overlap, weight sync, TP vs GPUs, backend vs ranks
    "rollout.ray.num_actors=7", "distributed.overlap=true", "rollout.vllm.weight_sync=nccl",
    "rollout.vllm.tensor_parallel_size=2", "train.backend=torch",
]
_RUN_BROKEN = """
import json, sys
from flows.cli import main
codes = [main(["train", "--config", sys.argv[1], "--root", sys.argv[2], "--set", layout]) for layout in sys.argv[3:]]
heavy = sorted(m for m in ("prefect", "ray", "deepspeed", "vllm", "transformers.models") if m in sys.modules)
print(json.dumps({"codes": codes, "imported": heavy}))
"""


def test_broken_layouts_fail_in_one_line_naming_the_fields_before_anything_starts(tmp_path):
    config = tmp_path / "paper.yaml"
    config.write_text("preset: r1-distill-1.5b\n")
    root = tmp_path / "root"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    done = subprocess.run([sys.executable, "-c", _RUN_BROKEN, str(config), str(root), *BROKEN_LAYOUTS],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"codes": [2] * len(BROKEN_LAYOUTS), "imported": []}, done.stderr  # no Prefect API, Ray or model
    lines = done.stderr.splitlines()
    assert len(lines) == len(BROKEN_LAYOUTS), done.stderr  # one line each
    named = ["rollout.ray.num_actors (7) must equal distributed.trainer_ranks (8)", "distributed.overlap needs",
             "rollout.vllm.weight_sync ('nccl')", "rollout.vllm.tensor_parallel_size (2) must equal",
             "train.backend ('torch')"]
    for line, fields in zip(lines, named, strict=True):
        assert line.startswith(f"attnrl train: error: invalid configuration in {config}: layout: {fields}"), line
    assert not list(root.iterdir())


def _recent_roots(client) -> set[str]:
    """The ``root`` parameters of the session API's newest flow runs."""
    return {run.parameters.get("root") for run in client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                                                                        limit=20)}


def test_a_command_reports_to_the_projects_running_server_and_without_one_to_a_temporary_api(prefect_api, tmp_path):
    """What every stage of a `dvc repro` does: `make server` left its URL in .prefect-server/api_url."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),  # no profile with an API URL
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    (tmp_path / ".prefect-server").mkdir()
    recorded = tmp_path / ".prefect-server" / "api_url"
    command = [str(Path(sys.executable).parent / "attnrl"), "prepare", "--config", str(PROJECT_ROOT / "params.yaml"),
               *_sets(small_overrides())]

    recorded.write_text(str(prefect_api.api_url).rstrip("/") + "\n")
    served = subprocess.run([*command, "--root", str(tmp_path / "served")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    assert "reporting to this project's Prefect server at" in served.stderr
    assert str(tmp_path / "served") in _recent_roots(prefect_api)

    with socket.socket() as probe:  # a port nothing listens on: a server that has stopped
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/api"
    recorded.write_text(dead + "\n")
    fallback = subprocess.run([*command, "--root", str(tmp_path / "temporary")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert f"no Prefect server answers at {dead}" in fallback.stderr
    assert str(tmp_path / "temporary") not in _recent_roots(prefect_api)
    assert (tmp_path / "temporary" / "data" / "prepared" / "train.parquet").is_file()
