from __future__ import annotations

import math

import pytest

from attnrl.advantages import (
    ADVANTAGE_ESTIMATORS,
    get_advantage_estimator,
    grpo_advantages,
    grpo_question_tree,
)
from attnrl.tree import Continuation, InitialResponse, build_question_tree


def test_grpo_hand_values_unbiased_std():
    # mean 0.5; unbiased std = sqrt(4·0.25 / 3) = sqrt(1/3); (±0.5) / (sqrt(1/3) + 1e-6) = ±0.8660239
    got = grpo_advantages([1.0, 0.0, 0.0, 1.0])
    want = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert got == pytest.approx([want, -want, -want, want], rel=1e-12)
    assert got[0] == pytest.approx(0.8660239, abs=1e-6)  # eps shifts the 7th digit
    # mean 2, std sqrt(2): ±1/sqrt(2)
    assert grpo_advantages([3.0, 1.0]) == pytest.approx([0.7071063, -0.7071063], abs=1e-6)


def test_grpo_uniform_group_is_zero_and_eps_is_used():
    assert grpo_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    assert grpo_advantages([-1.0, -1.0]) == [0.0, 0.0]
    assert grpo_advantages([1.0, 0.0], eps=1.0)[0] == pytest.approx(0.5 / (math.sqrt(0.5) + 1.0))


def test_grpo_group_of_one_uses_mean_zero_std_one():
    # spec §13.1 / verl: size-1 group -> mean 0, std 1, so A = R / (1 + eps), not 0.
    assert grpo_advantages([1.0]) == [pytest.approx(1.0 / (1.0 + 1e-6), rel=1e-15)]
    assert grpo_advantages([-1.0]) == [pytest.approx(-1.0 / (1.0 + 1e-6), rel=1e-15)]
    assert grpo_advantages([]) == []


def test_grpo_question_tree_trains_every_response_on_pm1_scores():
    responses = [
        InitialResponse((1, 2, 3), (-0.1, -0.2, -0.3), 1.0),
        InitialResponse((4, 5), (-0.4, -0.5), 0.0),
        InitialResponse((6,), (-0.6,), 0.0),
    ]
    tree = grpo_question_tree("g", responses)
    # scores (1, −1, −1): mean −1/3, unbiased std sqrt(4/3) -> 2/sqrt(3) and −1/sqrt(3)
    hi, lo = (4 / 3) / (math.sqrt(4 / 3) + 1e-6), (-2 / 3) / (math.sqrt(4 / 3) + 1e-6)
    assert [p.advantages for p in tree.paths] == [
        pytest.approx((hi,) * 3),
        pytest.approx((lo,) * 2),
        pytest.approx((lo,)),
    ]
    assert hi == pytest.approx(1.1547, abs=1e-4)
    assert [p.token_ids for p in tree.paths] == [(1, 2, 3), (4, 5), (6,)]
    assert [p.logprobs for p in tree.paths] == [(-0.1, -0.2, -0.3), (-0.4, -0.5), (-0.6,)]
    assert [(p.original_tokens, p.ends_in_continuation, p.reward) for p in tree.paths] == [
        (3, False, 1.0),
        (2, False, 0.0),
        (1, False, 0.0),
    ]
    assert tree.root_value == pytest.approx(1 / 3)
    assert tree.leaf_rewards == (1.0, 0.0, 0.0)


def test_grpo_question_tree_rejects_branching_and_bad_rewards():
    branched = InitialResponse((1, 2, 3), (0.0, 0.0, 0.0), 1.0, (Continuation(1, (9,), (0.0,), 0.0),))
    with pytest.raises(ValueError, match="GRPO does not branch"):
        grpo_question_tree("g", [branched])
    with pytest.raises(ValueError, match="reward must be 0 or 1"):
        grpo_question_tree("g", [InitialResponse((1,), (0.0,), 0.5)])
    with pytest.raises(ValueError, match="no responses"):
        grpo_question_tree("g", [])


def test_registry_and_unknown_name():
    assert set(ADVANTAGE_ESTIMATORS) == {"tree", "grpo"}
    assert get_advantage_estimator("tree") is build_question_tree
    assert get_advantage_estimator("grpo") is grpo_question_tree
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'gae'; known: grpo, tree"):
        get_advantage_estimator("gae")


def test_estimators_share_one_signature():
    responses = [InitialResponse((1, 2), (-0.1, -0.2), 1.0), InitialResponse((3,), (-0.3,), 0.0)]
    for name, estimator in ADVANTAGE_ESTIMATORS.items():
        tree = estimator("q", responses)
        assert tree.root_value == pytest.approx(0.5), name
