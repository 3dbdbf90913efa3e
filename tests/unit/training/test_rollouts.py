"""Assembling training sequences from initial samples and continuations (spec §6, §7, §9, §10)."""

from __future__ import annotations

import random

from attnrl.config import resolve_config
from attnrl.data.problem import make_problem
from attnrl.rollout.engine import Completion
from attnrl.sampling import RunningMean
from attnrl.steps import StepSegmentation
from attnrl.training.rollouts import (
    QuestionPart,
    ScoredQuestion,
    ScoredResponse,
    build_trees,
    continuation_requests,
    plan_branches,
    question_parts,
    trainable_trees,
    training_sequences,
)

PROMPT = (1, 2, 3)


def _response(tokens, reward, boundaries, fci):
    return ScoredResponse(
        token_ids=tuple(tokens),
        logprobs=tuple(-0.1 * (i + 1) for i in range(len(tokens))),
        entropies=tuple(1.0 for _ in tokens),
        segmentation=StepSegmentation(tuple(boundaries)),
        fci=tuple(fci),
        reward=reward,
        finish_reason="stop",
    )


def _question(rewards):
    problem = make_problem(id=0, prompt="q", answers=["1"], source="toy", split="train", where="test")
    # Response tokens 10..17 in three steps: [0,3) [3,6) [6,8); absolute boundaries start at P=3.
    responses = tuple(
        _response(range(10, 18), r, (0, 3, 6, 9, 11), (0.0, 0.9, 0.1)) for r in rewards
    )
    return ScoredQuestion(problem, PROMPT, responses)


def _algorithm(*overrides):
    return resolve_config(preset="tiny", overrides=[
        "algorithm.min_branch_position=0", "algorithm.min_branch_spacing=0", "algorithm.num_branch_points=1",
        "algorithm.continuations_per_branch=2", *overrides,
    ]).algorithm


def test_minority_responses_branch_at_the_high_fci_step_and_sequences_carry_behaviour_logprobs():
    batch = [_question([1.0, 0.0, 0.0, 0.0])]
    algorithm = _algorithm()
    plans, points = plan_branches(batch, algorithm, RunningMean(), random.Random(0))
    # z = 1/4 < 0.5: the correct response is the minority and is always expanded (spec §7.4).
    assert 0 in plans[0].expand and len(plans[0].expand) == 4  # ceil(4·e^-0.25) = 4
    assert {p.offset for p in points} == {3}  # step 2 (FCI 0.9) starts at response offset 3
    requests = continuation_requests(batch, points, n=2, max_new_tokens=20)
    assert requests[0].prompt_ids == PROMPT + (10, 11, 12) and requests[0].n == 2
    assert requests[0].max_new_tokens == 17

    continuations = [[Completion((50, 51), (-1.0, -2.0), "stop"), Completion((60,), (-3.0,), "stop")] for _ in points]
    flat_logprobs = [(-5.0, -6.0), (-7.0,)] * len(points)
    rewards = [1.0, 0.0] * len(points)
    trees, dropped = trainable_trees(build_trees(batch, plans, points, continuations, flat_logprobs, rewards, algorithm), algorithm)
    assert dropped == 0 and len(trees) == 1
    sequences = training_sequences(trees, {batch[0].problem.uid: PROMPT})
    # Per expanded response: the original path plus two continuation paths.
    assert len(sequences) == 3 * len(points)
    original, first, second = sequences[:3]
    assert original.response_ids == tuple(range(10, 18))
    assert original.old_logprobs == batch[0].responses[0].logprobs
    # Continuation paths: stored log-probs for the shared prefix, fresh ones for the new tokens (§10.2).
    assert first.response_ids == (10, 11, 12, 50, 51)
    assert first.old_logprobs == batch[0].responses[0].logprobs[:3] + (-5.0, -6.0)
    assert second.old_logprobs == batch[0].responses[0].logprobs[:3] + (-7.0,)
    assert all(s.prompt_ids == PROMPT for s in sequences)


def test_questions_with_one_outcome_everywhere_are_filtered():
    batch = [_question([0.0, 0.0, 0.0, 0.0])]
    algorithm = _algorithm()
    plans, points = plan_branches(batch, algorithm, RunningMean(), random.Random(0))
    continuations = [[Completion((50,), (-1.0,), "stop")] * 2 for _ in points]
    built = build_trees(batch, plans, points, continuations, [(-1.0,)] * (2 * len(points)),
                        [0.0] * (2 * len(points)), algorithm)
    assert len(built) == 1
    trees, dropped = trainable_trees(built, algorithm)
    assert trees == [] and dropped == 1
    kept, dropped = trainable_trees(built, _algorithm("algorithm.zero_advantage_filter=false"))
    assert kept == built and dropped == 0


def test_easy_questions_below_the_running_mean_are_dropped_before_branching():
    easy_mean = RunningMean()
    easy_mean.update([10.0])  # a past all-correct question with a far higher mean FCI
    plans, points = plan_branches([_question([1.0] * 4)], _algorithm(), easy_mean, random.Random(0))
    assert plans[0].drop and points == []


def test_a_batch_built_in_question_parts_gives_the_trees_of_the_whole_batch():
    algorithm = _algorithm("algorithm.num_branch_points=2")
    rng = random.Random(3)
    batch = [_question([float(rng.random() < 0.4) for _ in range(4)]) for _ in range(9)]
    batch = [ScoredQuestion(make_problem(id=q, prompt="q", answers=["1"], source="toy", split="train", where="test"),
                            sq.prompt_ids, sq.responses) for q, sq in enumerate(batch)]
    plans, points = plan_branches(batch, algorithm, RunningMean(), random.Random(0))
    assert points and len({p.question for p in points}) > 2
    continuations = [[Completion((50 + k,), (-1.0,), "stop") for k in range(2)] for _ in points]
    logprobs = [(-0.5,)] * (2 * len(points))
    rewards = [float(rng.random() < 0.5) for _ in range(2 * len(points))]
    whole = build_trees(batch, plans, points, continuations, logprobs, rewards, algorithm)
    for count in (1, 2, 3, 4, 50):
        parts = question_parts(points, len(batch), count)
        # Whole questions, in order, every question and point exactly once, no part without points.
        assert [p.questions.start for p in parts] == [0] + [p.questions.stop for p in parts[:-1]]
        assert [p.points.start for p in parts] == [0] + [p.points.stop for p in parts[:-1]]
        assert parts[-1].questions.stop == len(batch) and parts[-1].points.stop == len(points)
        assert all(p.points.stop > p.points.start for p in parts) and len(parts) <= count
        # Balanced: a part ends at the first question that reaches its share of the points.
        assert all(part.points.stop * count >= (j + 1) * len(points) for j, part in enumerate(parts[:-1]))
        pieces = []
        for part in parts:
            local = part.branch_points(points)
            assert all(0 <= p.question < part.questions.stop - part.questions.start for p in local)
            flat = slice(2 * part.points.start, 2 * part.points.stop)  # two continuations per point
            pieces += build_trees(batch[part.questions], plans[part.questions], local, continuations[part.points],
                                  logprobs[flat], rewards[flat], algorithm)
        assert pieces == whole, count
    assert len(question_parts(points, len(batch), 4)) == 4
    assert question_parts([], 3, 4) == [QuestionPart(slice(0, 3), slice(0, 0))]
