"""Checkpoints hold no pickle that runs code: the loop state is versioned JSON, the optimizer loads weights-only."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnrl.config import resolve_config
from attnrl.data.problem import Problem
from attnrl.errors import CheckpointError
from attnrl.steps import StepSegmentation
from attnrl.training.backend import OPTIMIZER_FILE, build_backend
from attnrl.training.budget import PromptCosts
from attnrl.training.checkpoint import LOOP_STATE_FILE, load_loop_state, write_loop_state
from attnrl.training.loop import LoopState
from attnrl.training.rollouts import ScoredQuestion, ScoredResponse
from attnrl.utils.tensor_files import load_tensor_file
from tests.conftest import tamper


def _state() -> LoopState:
    problem = Problem(id="7", prompt=({"role": "user", "content": "2+2?"},), answers=("4", "four"), source="synthetic",
                      split="train", level=3)
    response = ScoredResponse(
        token_ids=(5, 6, 7, 8), logprobs=(-0.1 - 0.2, -1e-310, float("-inf")), entropies=(0.30000000000000004, 0.0),
        segmentation=StepSegmentation((0, 2, 3, 4), think_position=-1), fci=(0.125, float("nan")), reward=1.0,
        finish_reason="stop")
    return LoopState(
        step=4, generation_calls=5, generated_tokens=1234, sampler={"epoch": 1, "position": 17},
        easy_mean={"sum": 2.0 / 3.0, "count": 3}, controller={"size": 8, "updates": 2},
        pending_scored=[ScoredQuestion(problem, (1, 2, 3), (response, response))], pending_prompts=[problem],
        rounds_without_update=1, costs=PromptCosts(10, 2, 7, 1), metrics=[{"loss": 1 / 3, "reward": float("nan")}])


def _identical(a: object, b: object) -> bool:
    """Equal, with NaN equal to NaN and every float bit for bit (``==`` says NaN != NaN)."""
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return all(_identical(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def test_the_loop_state_round_trips_bit_for_bit(tmp_path):
    state = _state()
    write_loop_state(tmp_path / LOOP_STATE_FILE, state)
    assert _identical(load_loop_state(tmp_path), state)
    assert not _identical(LoopState(metrics=[{"x": 1.0}]), LoopState(metrics=[{"x": 1.0000000000000002}]))
    assert not _identical(LoopState(metrics=[{"x": 1.0}]), LoopState(metrics=[{"x": 1}]))


def _rewrite(path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.update(version=0), "version 0; this attnrl reads 'attnrl-loop-state' version 1"),
    (lambda r: r.update(format="verl"), "format 'verl' version 1"),
    (lambda r: r["state"].update(step="4"), "state.step"),
    (lambda r: r["state"]["pending_scored"][0]["responses"][0].pop("reward"), "reward"),
    (lambda r: r["state"].update(surplus=1), "surplus"),
])
def test_a_foreign_or_changed_loop_state_is_refused_naming_the_file(tmp_path, change, message):
    write_loop_state(tmp_path / LOOP_STATE_FILE, _state())
    _rewrite(tmp_path / LOOP_STATE_FILE, change)
    with pytest.raises(CheckpointError, match=str(tmp_path / LOOP_STATE_FILE)) as error:
        load_loop_state(tmp_path)
    assert message in str(error.value)


def test_an_older_pickled_loop_state_is_named_not_loaded(tmp_path):
    torch.save(LoopState(), tmp_path / "loop_state.pt")
    with pytest.raises(CheckpointError, match="loop_state.json: missing .*older attnrl's pickle"):
        load_loop_state(tmp_path)


def test_a_tampered_optimizer_file_is_refused_before_its_payload_runs(tiny_policy, tmp_path):
    model, _ = tiny_policy
    backend = build_backend("torch", model, resolve_config(preset="tiny").train)
    backend.save(tmp_path)
    state = torch.load(tmp_path / OPTIMIZER_FILE, weights_only=True)
    backend.load(tmp_path)  # the untouched file loads

    marker = tmp_path / "payload-ran"
    tamper(tmp_path / OPTIMIZER_FILE, state, marker)
    with pytest.raises(CheckpointError, match=f"{tmp_path / OPTIMIZER_FILE}: refused.*posix.mkdir"):
        backend.load(tmp_path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="missing"):
        load_tensor_file(tmp_path / "absent.pt")
