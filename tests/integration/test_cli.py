"""The ``attnrl`` command as a user runs it: the demo (the pipeline flow) end to end, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert "before" in out and "after" in out and '"step": 2.0' in out
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


def test_missing_model_path_fails_clearly(prefect_api, tmp_path, capsys):
    code = main(["evaluate", "--config", str(PROJECT_ROOT / "params.yaml"), "--root", str(tmp_path),
                 "--model", str(tmp_path / "no-such-model")])
    assert code == 2
    assert "model path does not exist" in capsys.readouterr().err


def test_config_command_prints_a_loadable_preset(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "config", "--preset", "r1-distill-1.5b"],
        check=True, capture_output=True, text=True,
    ).stdout
    (tmp_path / "params.yaml").write_text(out)
    from attnrl.config import load_config

    assert load_config(tmp_path / "params.yaml").model.path == "models/DeepSeek-R1-Distill-Qwen-1.5B"
