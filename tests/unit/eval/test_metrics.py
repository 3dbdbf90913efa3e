from __future__ import annotations

import pytest

from attnrl.eval.metrics import SampleResult, benchmark_scores, format_table, summarise


def _results(benchmark, rewards_per_problem):
    return [
        SampleResult(benchmark, f"q{i}", float(r)) for i, rewards in enumerate(rewards_per_problem) for r in rewards
    ]


def test_mean_and_pass_at_k_by_hand():
    # aime: q0 2/4 correct, q1 0/4, q2 4/4 -> mean@4 = (0.5+0+1)/3, pass@4 = 2/3
    results = _results("aime", [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]) + _results("math", [[1], [0]])
    aime, math = benchmark_scores(results)
    assert (aime.benchmark, aime.problems, aime.k) == ("aime", 3, 4)
    assert aime.mean_at_k == pytest.approx(0.5) and aime.pass_at_k == pytest.approx(2 / 3)
    assert (math.k, math.mean_at_k, math.pass_at_k) == (1, 0.5, 0.5)


def test_average_is_unweighted_over_benchmarks():
    # Spec §14: (39.7+28.5+83.2+90.0+40.3+61.4)/6 = 57.2 regardless of benchmark sizes.
    big = _results("big", [[1]] * 90 + [[0]] * 10)  # 0.9 over 100 problems
    small = _results("small", [[0], [1], [0], [0]])  # 0.25 over 4 problems
    summary = summarise(benchmark_scores(big + small))
    assert summary["average"]["mean_at_k"] == pytest.approx((0.9 + 0.25) / 2)


def test_unequal_k_and_bad_rewards_are_errors():
    with pytest.raises(ValueError, match="different sample counts"):
        benchmark_scores([SampleResult("b", "q0", 1.0), SampleResult("b", "q0", 0.0), SampleResult("b", "q1", 1.0)])
    with pytest.raises(ValueError, match="reward must be 0 or 1"):
        benchmark_scores([SampleResult("b", "q0", 0.5)])
    with pytest.raises(ValueError, match="no benchmark"):
        summarise([])


def test_table_lists_every_benchmark_and_the_average():
    table = format_table(benchmark_scores(_results("aime", [[1, 0]]) + _results("math", [[1, 1]])))
    lines = table.splitlines()
    assert [line.split()[0] for line in lines] == ["benchmark", "aime", "math", "average"]
    assert "75.0%" in lines[-1] and "100.0%" in lines[-1]
