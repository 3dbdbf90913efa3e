"""Per-step metrics against a hand-computed batch, with the official definitions' edge cases (spec §15.4)."""

from __future__ import annotations

import pytest

from attnrl.data.problem import make_problem
from attnrl.sampling import ExpansionPlan
from attnrl.steps import StepSegmentation
from attnrl.training.metrics import merged_update_stats, outcome_ratios, step_metrics
from attnrl.training.rollouts import BranchPoint, ScoredQuestion, ScoredResponse
from attnrl.tree import Continuation, InitialResponse, build_question_tree, filter_zero_advantage_questions

LENGTH = 6  # every initial response; continuations branch at offset 2 and add 3 tokens (paths of 5)


def _question(name: str, rewards: list[float]) -> ScoredQuestion:
    problem = make_problem(id=name, prompt="q", answers=["1"], source="toy", split="train", where="test")
    responses = tuple(
        ScoredResponse(token_ids=tuple(range(LENGTH)), logprobs=(-0.1,) * LENGTH, entropies=(0.5,) * LENGTH,
                       segmentation=StepSegmentation((0, 3, 6, 3 + LENGTH)), fci=(0.0, 0.0), reward=r,
                       finish_reason="stop")
        for r in rewards
    )
    return ScoredQuestion(problem, (1, 2, 3), responses)


def _tree(question: ScoredQuestion, continuation_rewards: list[float]):
    """Response 0 expanded at offset 2 with one continuation per reward."""
    continuations = tuple(Continuation(2, (7, 8, 9), (-0.2,) * 3, r) for r in continuation_rewards)
    responses = [InitialResponse(r.token_ids, r.logprobs, r.reward, continuations if i == 0 else ())
                 for i, r in enumerate(question.responses)]
    return build_question_tree(question.problem.uid, responses)


@pytest.fixture()
def batch():
    # a: all right, easy-filtered | b: all right, continuations all right (zero advantage: dropped)
    # c: all wrong, continuations mixed | d: mixed, continuations all wrong
    questions = [_question("a", [1, 1]), _question("b", [1, 1]), _question("c", [0, 0]), _question("d", [1, 0])]
    plans = [ExpansionPlan(q.problem.uid, drop=name == "a", expand=() if name == "a" else (0,))
             for name, q in zip("abcd", questions, strict=True)]
    built = [_tree(questions[1], [1, 1]), _tree(questions[2], [1, 0]), _tree(questions[3], [0, 0])]
    trees, dropped = filter_zero_advantage_questions(built)
    points = [BranchPoint(q, 0, 2) for q in (1, 2, 3)]
    return questions, plans, points, built, trees, dropped


def test_a_hand_computed_batch(batch):
    questions, plans, points, built, trees, dropped = batch
    assert [t.question for t in trees] == ["toy/c", "toy/d"] and dropped == 1
    m = step_metrics(step=3, batch=questions, plans=plans, points=points, built=built, trees=trees,
                     dropped_zero=dropped, sequences=[], update={"loss": 0.5})
    expected = {
        # initial samples of the whole batch: a, b all right; c all wrong; d mixed
        "solve_all_ratio": 2 / 4, "solve_none_ratio": 1 / 4, "valid_ratio": 1 / 4, "reward": 5 / 8,
        # continuations of b (1, 1), c (1, 0), d (0, 0); a got none (easy filter)
        "solve_all_ratio_mc": 1 / 3, "solve_none_ratio_mc": 1 / 3, "valid_ratio_mc": 1 / 3, "mc_reward": 3 / 6,
        # trained on: c and d, each with paths of both outcomes
        "solve_all_ratio_all": 0.0, "solve_none_ratio_all": 0.0, "valid_ratio_all": 1.0,
        # Fig. 7(a): all right once = {a, b}; twice = {b}; a was filtered. All wrong once = {c}; its MC mixed
        "correct_once_twice_invalid_ratio": 1 / 2, "correct_once_twice_valid_ratio": 1 / 2,
        "correct_once_filtered_ratio": 1 / 2,
        "incorrect_once_twice_invalid_ratio": 0.0, "incorrect_once_twice_valid_ratio": 1.0,
        "incorrect_once_filtered_ratio": 0.0,
        "easy_filtered_ratio": 1 / 4, "filtered_ratio_all": 2 / 4, "zero_advantage_dropped": 1.0,
        "branch_points": 3.0, "update/loss": 0.5,
        # after the filter every trained path has a non-zero advantage (spec §7.6): 4 paths of c, d
        # (the original response, 6 tokens, and two continuation paths of 2 + 3 tokens each)
        "valid_token_ratio": 1.0, "valid_tokens": 2 * (6 + 5 + 5), "valid_response_ratio": 1.0,
        # before it, b's three paths (all advantages 0) count against
        "valid_token_ratio_built": 32 / 48,
    }
    assert {k: m[k] for k in expected} == pytest.approx(expected)


def test_empty_populations_give_zero_not_a_division_error(batch):
    questions = [q for q in batch[0] if q.problem.id != "c"]  # no all-wrong question
    everything_dropped = [ExpansionPlan(q.problem.uid, drop=True, expand=()) for q in questions]
    m = step_metrics(step=1, batch=questions, plans=everything_dropped, points=[], built=[], trees=[],
                     dropped_zero=0, sequences=[], update={})
    for key in ("solve_all_ratio_mc", "valid_ratio_mc", "valid_ratio_all", "mc_reward", "valid_token_ratio",
                "valid_response_ratio", "valid_token_ratio_built", "correct_once_twice_invalid_ratio"):
        assert m[key] == 0.0, key
    assert m["correct_once_twice_valid_ratio"] == 1.0 and m["correct_once_filtered_ratio"] == 1.0
    assert m["incorrect_once_twice_valid_ratio"] == 0.0  # no all-wrong question: 0.0, not 0/0
    assert m["filtered_ratio_all"] == 1.0 == m["easy_filtered_ratio"]
    assert outcome_ratios([], "_x") == {"solve_all_ratio_x": 0.0, "solve_none_ratio_x": 0.0, "valid_ratio_x": 0.0}


def test_merged_update_stats_weigh_each_update_by_its_optimizer_steps():
    # A streamed step: one mini-batch of 1 optimizer step, then one of 3.
    merged = merged_update_stats([{"optimizer_steps": 1.0, "loss": 1.0, "clip_fraction": 0.4},
                                  {"optimizer_steps": 3.0, "loss": 2.0, "clip_fraction": 0.0}])
    assert merged == {"loss": 1.75, "clip_fraction": 0.1, "optimizer_steps": 4.0}
    assert merged_update_stats([]) == {} and merged_update_stats([{"optimizer_steps": 0.0, "loss": 5.0}]) == {}
