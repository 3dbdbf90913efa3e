"""How evaluation spends its generation calls (attnrl/stages/evaluate.py): calls as large as the engines' batch,
each seeded by its index, every sample graded and kept in problem order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
import torch

from attnrl.config import resolve_config
from attnrl.data.problem import Problem
from attnrl.reward.verifier import Verifier
from attnrl.rollout.engine import Completion, GenerationRequest, SamplingParams
from attnrl.stages.evaluate import evaluate_problems


class RecordingEngine:
    """Answers every sample with ``\\boxed{7}`` and EOS, recording each call's size and seed."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls: list[tuple[int, int]] = []  # (samples, seed)

    def generate(self, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int):
        self.calls.append((sum(r.n for r in requests), seed))
        answer = self.tokenizer.encode("\\boxed{7}", add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return [[Completion(tuple(answer), (0.0,) * len(answer), "stop")] * r.n for r in requests]

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        raise AssertionError("evaluation never updates weights")


@pytest.mark.parametrize(("problems", "k", "call_rows", "calls"), [
    (10, 4, 256, [40]),  # everything fits one call: the engines see the whole benchmark at once
    (10, 4, 12, [12, 12, 12, 4]),  # 3 problems of 4 samples per call
    (3, 8, 5, [8, 8, 8]),  # a problem's k samples are never split, even past the engines' batch
])
def test_calls_are_sized_to_the_engines_batch(tiny_policy, problems, k, call_rows, calls):
    tokenizer = tiny_policy[1]
    config = resolve_config(preset="tiny")
    batch = [Problem(id=f"p{i}", prompt=({"role": "user", "content": f"{i}+0"},), answers=("7",), source="s", split="test")
             for i in range(problems)]
    engine = RecordingEngine(tokenizer)
    with Verifier(timeout_s=5, workers=1) as verifier:
        rows = evaluate_problems(batch, k, engine, tokenizer, verifier, config, "s", call_rows=call_rows)
    assert [samples for samples, _ in engine.calls] == calls
    assert len({seed for _, seed in engine.calls}) == len(calls)  # each call its own seed
    assert [(r["problem_id"], r["sample"]) for r in rows] == [(f"p{i}", s) for i in range(problems) for s in range(k)]
    assert all(r["reward"] == 1.0 and r["finish_reason"] == "stop" for r in rows)
