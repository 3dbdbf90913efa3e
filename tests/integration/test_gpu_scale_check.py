"""benchmarks/gpu_scale_check.py: its settings are the schema's paper defaults, and it runs end to end (--small)."""

from __future__ import annotations

import importlib.util

from attnrl.config.schema import AlgorithmConfig, TrainConfig
from tests.conftest import PROJECT_ROOT


def _script():
    spec = importlib.util.spec_from_file_location("gpu_scale_check", PROJECT_ROOT / "benchmarks" / "gpu_scale_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_settings_are_the_paper_defaults_of_the_schema():
    script = _script()
    train, algorithm = TrainConfig(), AlgorithmConfig()
    assert {key: getattr(train, key) for key in script.TRAIN} == script.TRAIN
    assert {key: getattr(algorithm, key) for key in script.ALGORITHM} == script.ALGORITHM


def test_small_run_scores_with_fci_and_updates_in_token_budget_micro_batches():
    report = _script().run(small=True)
    assert report["micro_batches_per_pass"] == 2  # 3 sequences of 128 tokens in a 256-token budget
    assert set(report["passes"]) == {"score", "reference", "update"}
    assert report["update"]["optimizer_steps"] == 1.0 and report["all_scores_finite"]
