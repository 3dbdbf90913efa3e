"""evaluate-latest picks the newest complete checkpoint, else the final policy, else fails clearly."""

from __future__ import annotations

import pytest

from attnrl.errors import ModelLoadError
from attnrl.training.checkpoint import LATEST
from flows.evaluate_latest import newest_model_dir


def _model(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_the_newest_checkpoint_wins_over_the_final_policy(tmp_path):
    _model(tmp_path / "final")
    _model(tmp_path / "checkpoints" / "step_000002" / "model")
    newest = _model(tmp_path / "checkpoints" / "step_000004" / "model")
    (tmp_path / "checkpoints" / LATEST).write_text("step_000004")
    assert newest_model_dir(tmp_path) == newest


def test_without_a_checkpoint_the_final_policy_is_used(tmp_path):
    final = _model(tmp_path / "final")
    (tmp_path / "checkpoints").mkdir()
    assert newest_model_dir(tmp_path) == final


def test_nothing_trained_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no trained policy to evaluate.*run the train stage first"):
        newest_model_dir(tmp_path)
