"""N training steps equal N/2 steps, a restart from the checkpoint, and N/2 more (architecture.md)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from attnrl.config import resolve_config
from attnrl.stages.prepare import prepare
from attnrl.stages.train import train
from attnrl.stages.warmup import warmup
from tests.conftest import small_overrides

TRAIN = [
    "train.backend=torch",
    "train.save_every=2",
    "train.max_tokens_per_micro_batch=256",
    "train.lr=1e-3",
]


def _config(steps: int, *extra: str):
    return resolve_config(preset="tiny", overrides=[*small_overrides(), *TRAIN, f"train.steps={steps}", *extra])


def _run(root, plan, extra=()):
    config = _config(plan[0], *extra)
    prepare(config, root)
    warmup(config, root)
    results = [train(_config(steps, *extra), root) for steps in plan]
    rows = [json.loads(line) for line in (root / "runs" / "train" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("step_time_s")
    return results, rows, load_file(str(root / "runs" / "train" / "final" / "model.safetensors"))


@pytest.mark.parametrize("mode", ["algorithm.off_policy=true", "algorithm.off_policy=false"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, mode):
    (_, straight_rows, straight) = _run(tmp_path / "straight", [4], [mode])
    (results, resumed_rows, resumed) = _run(tmp_path / "resumed", [2, 4], [mode])
    assert results[0].resumed_from is None
    assert results[1].resumed_from is not None and results[1].resumed_from.name == "step_000002"
    assert len(straight_rows) == 4
    assert resumed_rows == straight_rows
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # Something was learned at all: the weights moved away from the warmed-up policy.
    init = load_file(str(tmp_path / "straight" / "models" / "init" / "model.safetensors"))
    assert any(not torch.equal(init[name], straight[name]) for name in init)
