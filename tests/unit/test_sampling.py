from __future__ import annotations

import random

import pytest

from attnrl.config.schema import AlgorithmConfig
from attnrl.sampling import (
    BatchSizeController,
    ExpansionPlan,
    RunningMean,
    default_target_sequences,
    num_trees,
    plan_batch,
    plan_expansion,
    response_mean_fci,
)

# --- trees per problem (§7.3) ------------------------------------------------------------------

# Spec §7.3 table, correct/6 = 0..6: 6·e^{-z} = 6.00 5.08 4.30 3.64 3.08 2.61 2.21
TABLE_CEIL = [6, 6, 5, 4, 4, 3, 3]
TABLE_ROUND = [6, 5, 4, 4, 3, 3, 2]


@pytest.mark.parametrize("k", range(7))
def test_tree_count_table_for_both_rules(k):
    assert num_trees(k / 6, 6, "ceil") == TABLE_CEIL[k]
    assert num_trees(k / 6, 6, "round") == TABLE_ROUND[k]


def test_rules_differ_exactly_where_amb1_says():
    differ = [k for k in range(7) if num_trees(k / 6, 6, "ceil") != num_trees(k / 6, 6, "round")]
    assert differ == [1, 2, 4, 6]


def test_tree_count_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown rounding 'floor'; known: ceil, round"):
        num_trees(0.5, 6, "floor")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        num_trees(1.5, 6, "ceil")


# --- running mean ------------------------------------------------------------------------------


def test_running_mean_is_count_weighted_and_round_trips():
    ra = RunningMean()
    assert (ra.mean, ra.count) == (0.0, 0)
    ra.update([1.0, 2.0])
    ra.update([6.0])
    ra.update([])
    assert ra.count == 3 and ra.mean == pytest.approx(3.0)  # (1+2+6)/3, not mean of batch means (3.75)
    restored = RunningMean()
    restored.load_state_dict(ra.state_dict())
    assert (restored.mean, restored.count) == (ra.mean, ra.count)
    with pytest.raises(ValueError, match="finite"):
        ra.update([float("nan")])


# --- easy filter (§7.2) ------------------------------------------------------------------------

ALL_RIGHT = [1.0] * 6


def _plan(questions, easy_mean, easy_filter="all_correct", expansion="adaptive", rounding="ceil", seed=0):
    return plan_batch(
        questions, easy_mean, easy_filter=easy_filter, expansion=expansion, rounding=rounding, rng=random.Random(seed)
    )


def _primed(values):
    ra = RunningMean()
    ra.update(values)
    return ra


def test_easy_filter_compares_with_a_mean_that_includes_the_current_batch():
    # History: two easy problems at 0.1. This batch: easy q1 at 0.5, easy q2 at 0.2, mixed q3 at 0.0.
    # Updated mean = (0.1 + 0.1 + 0.5 + 0.2) / 4 = 0.225: q1 kept, q2 dropped (0.2 would beat the
    # stale 0.1). q3 is not all-correct, so the code's filter ignores it.
    ra = _primed([0.1, 0.1])
    plans = _plan(
        [("q1", ALL_RIGHT, [0.5] * 6), ("q2", ALL_RIGHT, [0.1, 0.3] * 3), ("q3", [1, 0, 0, 0, 0, 0], [0.0] * 6)], ra
    )
    assert ra.count == 4 and ra.mean == pytest.approx(0.225)
    assert [p.drop for p in plans] == [False, True, False]
    assert plans[0].expand == (0, 1, 2)  # first num_trees(1) = 3 in batch order
    assert plans[1].expand == () and plans[1].mean_attn == pytest.approx(0.2)


def test_lone_easy_question_in_first_batch_equals_the_mean_and_is_dropped():
    (plan,) = _plan([("q", ALL_RIGHT, [0.4] * 6)], RunningMean())
    assert plan.drop  # strict '>' against a mean that is its own value (code behaviour)


def test_paper_filter_applies_to_every_question_with_ge():
    ra = _primed([0.3])
    mixed_low = ("low", [1, 0, 1, 0, 1, 0], [0.1] * 6)
    mixed_tie = ("tie", [1, 0, 0, 0, 0, 0], [0.3] * 6)
    plans = _plan([mixed_low, mixed_tie], ra, easy_filter="all")
    assert ra.count == 1  # no all-correct question this batch
    assert [p.drop for p in plans] == [True, False]  # 0.1 < 0.3 dropped; 0.3 >= 0.3 kept


def test_filter_off_keeps_everything_and_leaves_the_mean_alone():
    ra = _primed([5.0])
    plans = _plan([("q", ALL_RIGHT, [0.0] * 6)], ra, easy_filter="off")
    assert not plans[0].drop and plans[0].expand == (0, 1, 2)
    assert (ra.count, ra.mean) == (1, 5.0)


def test_empty_mean_means_no_reference_yet():
    plan = plan_expansion(
        "q",
        [1, 0, 0, 0, 0, 0],
        [0.0] * 6,
        easy_mean=RunningMean(),
        easy_filter="all",
        expansion="adaptive",
        rounding="ceil",
        rng=random.Random(0),
    )
    assert not plan.drop


# --- which responses (§7.4) --------------------------------------------------------------------


def test_all_wrong_expands_everything_and_all_right_takes_the_first_num_trees():
    (wrong,) = _plan([("q", [0.0] * 6, [0.0] * 6)], RunningMean())
    assert wrong.expand == (0, 1, 2, 3, 4, 5) and wrong.z == 0.0
    ra = _primed([0.0] * 10)
    (right_ceil,) = _plan([("q", ALL_RIGHT, [1.0] * 6)], ra)
    (right_round,) = _plan([("q", ALL_RIGHT, [1.0] * 6)], ra, rounding="round")
    assert right_ceil.expand == (0, 1, 2) and right_round.expand == (0, 1)


@pytest.mark.parametrize(
    ("rewards", "rounding", "minority", "m"),
    [
        ([1, 1, 0, 1, 1, 1], "ceil", {2}, 3),  # z = 5/6: the one wrong + 2 random right
        ([1, 0, 1, 0, 1, 1], "ceil", {1, 3}, 4),  # z = 4/6
        ([0, 1, 1, 0, 0, 1], "ceil", {0, 3, 4}, 4),  # z = 1/2: ties branch all *incorrect*
        ([0, 1, 1, 0, 0, 1], "round", {0, 3, 4}, 4),
        ([0, 0, 1, 0, 0, 0], "round", {2}, 5),  # z = 1/6: the one right + 4 random wrong
        ([0, 1, 0, 0, 1, 0], "round", {1, 4}, 4),  # z = 2/6
        ([0, 1, 0, 0, 1, 0], "ceil", {1, 4}, 5),
    ],
)
def test_minority_outcome_is_always_expanded(rewards, rounding, minority, m):
    seen = set()
    for seed in range(30):
        (plan,) = _plan([("q", rewards, [0.0] * 6)], RunningMean(), easy_filter="off", rounding=rounding, seed=seed)
        assert len(plan.expand) == m and len(set(plan.expand)) == m
        assert minority <= set(plan.expand)
        assert list(plan.expand) == sorted(plan.expand)
        seen.add(plan.expand)
    # the majority fill is random (unless it takes the whole majority)
    majority = 6 - len(minority)
    assert len(seen) > 1 or m - len(minority) in (0, majority)


def test_expansion_is_reproducible_for_a_seed():
    batch = [("a", [1, 1, 0, 1, 1, 1], [0.0] * 6), ("b", [0, 0, 1, 0, 0, 0], [0.0] * 6)]
    assert _plan(batch, RunningMean(), seed=3) == _plan(batch, RunningMean(), seed=3)


def test_uniform_expansion_takes_every_response_but_still_filters():
    ra = _primed([0.5])
    plans = _plan([("a", [1, 0, 1, 1, 1, 1], [0.0] * 6), ("b", ALL_RIGHT, [0.0] * 6)], ra, expansion="uniform")
    assert plans[0] == ExpansionPlan("a", False, (0, 1, 2, 3, 4, 5), z=5 / 6, mean_attn=0.0)
    assert plans[1].drop  # mean = (0.5 + 0)/2 = 0.25 > 0.0


def test_bad_questions_are_errors():
    with pytest.raises(ValueError, match="rewards must be 0 or 1"):
        _plan([("q", [0.5, 1.0], [0.0, 0.0])], RunningMean())
    with pytest.raises(ValueError, match="1 mean FCI values for 2 responses"):
        _plan([("q", [0.0, 1.0], [0.0])], RunningMean())
    with pytest.raises(ValueError, match="unknown expansion 'all'; known: adaptive, uniform"):
        _plan([("q", [0.0, 1.0], [0.0, 0.0])], RunningMean(), expansion="all")
    with pytest.raises(ValueError, match="unknown easy_filter"):
        _plan([], RunningMean(), easy_filter="some")


def test_response_mean_fci_counts_zeroed_steps():
    assert response_mean_fci([0.0, 0.6, 0.0]) == pytest.approx(0.2)
    assert response_mean_fci([]) == 0.0


# --- adaptive batch size (§7.5) ----------------------------------------------------------------


def _controller(rounding, **kwargs):
    return BatchSizeController(initial_size=64, target=1920, ema_lambda=0.9, rounding=rounding, **kwargs)


def test_default_target_is_the_codes_1920():
    assert default_target_sequences(64, 6, 2, 2) == 1920  # 64·6·(1 + 2·2)
    controller = BatchSizeController.from_config(AlgorithmConfig(), n=6)
    assert (controller.size, controller.target, controller.rounding) == (64, 1920, "ceil")
    explicit = BatchSizeController.from_config(AlgorithmConfig(target_train_sequences=100), n=6)
    assert explicit.target == 100


@pytest.mark.parametrize(
    ("valid", "ceil_size", "round_size"),
    [
        # ceil:  ⌈0.1·⌊64·1920/B''⌋ + 0.9·64⌉          round: Round(0.9·64 + 0.1·(1920/B'')·64)
        (960, 71, 70),  # ⌈0.1·128 + 57.6⌉ = ⌈70.4⌉ = 71     | 57.6 + 12.8 = 70.4 -> 70
        (1920, 64, 64),  # on target: 6.4 + 57.6 = 64 exactly, both keep 64
        (2500, 63, 63),  # ⌈0.1·⌊49.152⌋ + 57.6⌉ = ⌈62.5⌉ = 63 | 57.6 + 4.9152 = 62.5152 -> 63
        (3840, 61, 61),  # ⌈0.1·32 + 57.6⌉ = ⌈60.8⌉ = 61       | 57.6 + 3.2 = 60.8 -> 61
        (1000, 70, 70),  # ⌈0.1·⌊122.88⌋ + 57.6⌉ = ⌈69.8⌉ = 70 | 57.6 + 12.288 = 69.888 -> 70
    ],
)
def test_batch_size_rule_by_hand(valid, ceil_size, round_size):
    assert _controller("ceil").next_size(valid) == ceil_size
    assert _controller("round").next_size(valid) == round_size


def test_batch_size_chains_and_stays_put_on_target():
    controller = _controller("ceil")
    assert [controller.next_size(v) for v in (960, 960, 1920)] == [71, 79, 79]
    # 71 -> ⌈0.1·⌊71·2⌋ + 63.9⌉ = ⌈14.2 + 63.9⌉ = ⌈78.1⌉ = 79; then on target it stays.
    # In binary floats 0.1·62 + 0.9·62 > 62, so ceil would creep up; exact arithmetic does not.
    on_target = BatchSizeController(initial_size=62, target=1920, rounding="ceil")
    assert on_target.next_size(1920) == 62


def test_empty_batch_grows_by_a_bounded_step():
    # AMBIG-14(h): B'' = 0 counts as half the target (ratio 2): the same as B'' = 960 here.
    assert _controller("ceil").next_size(0) == 71
    assert _controller("round").next_size(0) == 70
    capped = _controller("ceil", max_size=66)
    assert capped.next_size(0) == 66 and capped.next_size(0) == 66
    with pytest.raises(ValueError, match=">= 0"):
        _controller("ceil").next_size(-1)


def test_batch_size_is_clamped_below():
    controller = BatchSizeController(initial_size=8, target=10, rounding="round", min_size=5)
    for _ in range(40):
        controller.next_size(10**9)
    assert controller.size == 5
    floor_one = BatchSizeController(initial_size=3, target=10, rounding="ceil")
    for _ in range(40):
        floor_one.next_size(10**9)
    assert floor_one.size >= 1


def test_batch_controller_state_round_trip():
    controller = _controller("ceil")
    controller.next_size(960)
    restored = _controller("ceil")
    restored.load_state_dict(controller.state_dict())
    assert restored.size == controller.size == 71
    assert restored.next_size(960) == controller.next_size(960)


def test_batch_controller_validation():
    with pytest.raises(ValueError, match="unknown rounding 'floor'"):
        _controller("floor")
    with pytest.raises(ValueError, match="max_size"):
        _controller("ceil", min_size=10, max_size=5)
