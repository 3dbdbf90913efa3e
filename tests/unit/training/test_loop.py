"""The loops of spec §3 on a tiny model: generation calls per step, what each method trains."""

from __future__ import annotations

import copy

from attnrl.config import resolve_config
from attnrl.data.synthetic import generate_problems
from attnrl.reward.verifier import Verifier
from attnrl.rollout.hf_engine import HFRolloutEngine
from attnrl.training.backend import TorchBackend
from attnrl.training.loop import RLLoop
from attnrl.training.trainer import PolicyTrainer
from tests.conftest import small_overrides

SETTINGS = [
    "rollout.sampling.max_new_tokens=12",
    "train.micro_batch_sequences=8",
    "train.lr=1e-3",
    "algorithm.min_branch_position=0",
    "algorithm.min_branch_spacing=0",
]


class CountingEngine(HFRolloutEngine):
    """The real engine, counting its generation calls and requests."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def generate(self, requests, params, seed):
        self.calls.append(len(requests))
        return super().generate(requests, params, seed)


def _loop(tiny_policy, method):
    model, tokenizer = tiny_policy
    model = copy.deepcopy(model)
    config = resolve_config(preset="tiny", method=method, overrides=[*small_overrides(), *SETTINGS])
    engine = CountingEngine(copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    trainer = PolicyTrainer(
        model, TorchBackend(model, config.train), reference=copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id,
        algorithm=config.algorithm, train=config.train, temperature=1.0,
    )
    problems = generate_problems(config.data.synthetic, split="train", seed=1)
    verifier = Verifier(timeout_s=5.0)
    return RLLoop(config, problems=problems, engine=engine, trainer=trainer, tokenizer=tokenizer, verifier=verifier), engine


def test_one_step_off_policy_makes_one_generation_call_per_step(tiny_policy):
    loop, engine = _loop(tiny_policy, "attnrl")
    metrics = loop.run(3)
    # Bootstrapping call (initial samples of batch 1), then one call per training step (spec §3.2).
    assert len(engine.calls) == 4 and len(metrics) == 3
    # From the first training step on, each call mixes initial samples and continuations.
    assert all(requests > 4 for requests in engine.calls[1:]) or metrics[0]["branch_points"] == 0
    assert loop.state.step == 3 and loop.state.pending_scored is not None


def test_two_step_on_policy_makes_two_calls_per_step(tiny_policy):
    loop, engine = _loop(tiny_policy, "treerl")
    metrics = loop.run(2)
    assert len(engine.calls) == 4
    # TreeRL expands every response at N entropy points (spec §13.2): 4 prompts × 4 × 2 requests.
    assert engine.calls[1] == 4 * 4 * 2 and metrics[0]["branch_points"] == 32


def test_grpo_trains_every_initial_response_with_one_call(tiny_policy):
    loop, engine = _loop(tiny_policy, "grpo")
    metrics = loop.run(2)
    assert len(engine.calls) == 2
    assert [m["train_sequences"] for m in metrics] == [16.0, 16.0]
    assert all(m["branch_points"] == 0 for m in metrics)


SPEC_METRICS = ["reward", "accuracy", "entropy", "response_length", "solve_all_ratio_mc", "solve_none_ratio_mc",
                "valid_prompt_ratio", "valid_token_ratio", "filtered_ratio", "prompt_batch_size", "generated_tokens",
                "step_time_s"]


def test_every_step_reports_the_spec_metrics(tiny_policy):
    loop, _ = _loop(tiny_policy, "attnrl")
    [metrics] = loop.run(1)
    assert [key for key in SPEC_METRICS if key not in metrics] == []
    assert 0.0 <= metrics["valid_token_ratio"] <= 1.0 and metrics["prompt_batch_size"] == 4


def test_token_budget_stops_training(tiny_policy):
    loop, _ = _loop(tiny_policy, "grpo")
    loop.config.train.max_generated_tokens = 1
    assert len(loop.run(5)) == 1
