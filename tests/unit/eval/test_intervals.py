"""Means, t intervals and paired differences over seeds, against hand computation."""

from __future__ import annotations

import pytest

from attnrl.eval.intervals import mean_interval, paired_difference, ratio_interval


def test_the_interval_is_the_student_t_interval_of_the_mean():
    # mean 3, sample sd sqrt(2.5), n 5: half-width t(0.975, 4) = 2.7764 × 1.5811 / 2.2361 = 1.9632
    out = mean_interval([1, 2, 3, 4, 5], digits=3)
    assert out == {"mean": 3.0, "ci95": [1.037, 4.963], "n": 5}
    assert mean_interval([7.0]) == {"mean": 7.0, "ci95": None, "n": 1}
    with pytest.raises(ValueError):
        mean_interval([])


def test_a_paired_difference_removes_what_the_seeds_share():
    method = [50.0, 60.0, 70.0, 80.0, 90.0]
    baseline = [49.0, 58.0, 69.0, 78.0, 89.0]   # a wide spread, the same per seed: differences 1, 2, 1, 2, 1
    out = paired_difference(method, baseline, digits=3)
    assert out["mean"] == 1.4 and out["excludes_zero"] is True
    assert out["ci95"] == [0.72, 2.08]          # 1.4 ± 2.7764 × 0.5477 / 2.2361
    assert mean_interval(method)["ci95"][0] < mean_interval(baseline)["mean"]  # unpaired, the intervals overlap
    assert paired_difference([1.0, 2.0], [2.0, 1.0])["excludes_zero"] is False
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0], [1.0, 2.0])


def test_a_ratio_over_problems_has_a_bootstrap_interval_around_it():
    import random

    per_problem = [(1.0, 4.0), (3.0, 4.0), (2.0, 4.0), (0.0, 4.0), (4.0, 4.0)]  # 10 of 20
    out = ratio_interval(per_problem, random.Random(0))
    assert out["value"] == 0.5 and out["n"] == 20
    low, high = out["ci95"]
    assert 0.0 <= low < 0.5 < high <= 1.0
    same = ratio_interval([(2.0, 4.0)] * 5, random.Random(0))  # no spread between problems: no width
    assert same["ci95"] == [0.5, 0.5]


def test_a_difference_wholly_below_zero_excludes_zero_too():
    out = paired_difference([49.0, 58.0, 69.0, 78.0, 89.0], [50.0, 60.0, 70.0, 80.0, 90.0], digits=3)
    assert out["ci95"] == [-2.08, -0.72] and out["excludes_zero"] is True


def test_the_bootstrap_interval_is_the_central_95_percent_of_resampled_ratios():
    import random

    # 100 problems, half solved: a resample's ratio is Binomial(100, 0.5) / 100, whose central 95 % is
    # [0.40, 0.60] (0.5 ± 1.96 × 0.05); 1000 resamples estimate each end to about ±0.01.
    out = ratio_interval([(1.0, 1.0)] * 50 + [(0.0, 1.0)] * 50, random.Random(0))
    low, high = out["ci95"]
    assert abs(low - 0.40) <= 0.02 and abs(high - 0.60) <= 0.02, out


def test_the_bootstrap_resamples_every_problem_the_last_one_included():
    import random

    # Only the last of 10 problems is solved: a resample holds it with probability 1 - 0.9^10 = 0.65.
    out = ratio_interval([(0.0, 1.0)] * 9 + [(1.0, 1.0)], random.Random(0))
    assert out["value"] == 0.1 and out["ci95"][0] == 0.0 and out["ci95"][1] >= 0.2, out
