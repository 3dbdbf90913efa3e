"""The learning benchmark's arithmetic: evaluation marks, mean curves, tokens to a threshold, summaries."""

from __future__ import annotations

import pytest

from attnrl.eval.comparison import (
    curve_points,
    marks,
    mean_curve,
    paired_final_difference,
    summarise_runs,
    tokens_to_reach,
)

DIAGNOSTICS = ("valid_token_ratio",)


def run(method: str, seed: int, final: float, curve: list[tuple[int, int, float]]) -> dict:
    return {"method": method, "seed": seed, "lr": 1e-4, "final": final, "improvement": final - 50.0,
            "curve": [{"mark": m, "tokens": t, "average": a} for m, t, a in curve],
            "generated_tokens": 1000, "overshoot": -seed, "trained_tokens": 900, "valid_tokens": 800, "steps": 5,
            "optimizer_steps": 10, "train_s": 60.0, "diagnostics": {"valid_token_ratio": [1.0, 0.5]}}


def test_each_mark_is_evaluated_at_the_first_step_that_reaches_it_once():
    assert marks(100, 30) == [30, 60, 90, 100]
    rows = [{"step": k + 1, "total_generated_tokens": t} for k, t in enumerate([25, 70, 85, 101])]
    # 30 and 60 are both first reached by step 2 (evaluated once); 90 by the last step: the final policy's point.
    assert curve_points(rows, 100, 30) == [(30, 2)]
    with pytest.raises(ValueError):
        marks(100, 0)


def test_the_mean_curve_keeps_the_marks_every_seed_reached():
    runs = [run("a", 1, 60, [(0, 0, 50), (30, 31, 55), (100, 99, 60)]),
            run("a", 2, 70, [(0, 0, 50), (100, 101, 70)])]
    curve = mean_curve(runs)
    assert [(p["mark"], p["tokens"], p["accuracy"]["mean"]) for p in curve] == [(0, 0, 50.0), (100, 100, 65.0)]


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [{"tokens": t, "accuracy": {"mean": a}} for t, a in [(0, 50.0), (40, 60.0), (80, 80.0)]]
    assert tokens_to_reach(curve, 70.0) == 60
    assert tokens_to_reach(curve, 50.0) == 0
    assert tokens_to_reach(curve, 81.0) is None


def test_a_curve_that_reaches_the_threshold_exactly_and_stays_flat_reaches_it_there():
    flat = [{"tokens": t, "accuracy": {"mean": a}} for t, a in [(0, 50.0), (40, 70.0), (80, 70.0)]]
    assert tokens_to_reach(flat, 70.0) == 40
    level = [{"tokens": t, "accuracy": {"mean": a}} for t, a in [(0, 70.0), (40, 70.0)]]
    assert tokens_to_reach(level, 70.0) == 0


def test_a_summary_pairs_every_method_with_the_baseline_by_seed():
    runs = [run("grpo", s, f, [(0, 0, 50), (100, 100, f)]) for s, f in [(1, 60.0), (2, 70.0), (3, 80.0)]]
    runs += [run("attnrl", s, f, [(0, 0, 50), (100, 100, f)]) for s, f in [(1, 61.0), (2, 72.0), (3, 81.0)]]
    out = summarise_runs(runs, {"grpo": "GRPO", "attnrl": "AttnRL"}, "grpo", DIAGNOSTICS)
    assert list(out) == ["grpo", "attnrl"] and out["grpo"]["vs_baseline"] is None
    paired = out["attnrl"]["vs_baseline"]
    assert paired["mean"] == pytest.approx(4 / 3, abs=0.01) and paired["n"] == 3
    assert out["attnrl"]["tokens_to_baseline_final"] == 94  # GRPO's final mean 70: 50 -> 71.33 over 100 tokens, 93.75
    assert out["attnrl"]["overshoot"]["mean"] == -2.0 and out["attnrl"]["max_overshoot"] == -1
    assert out["attnrl"]["diagnostics"]["valid_token_ratio"]["mean"] == 0.75
    with pytest.raises(ValueError, match="seeds"):
        summarise_runs(runs[:-1], {"grpo": "GRPO", "attnrl": "AttnRL"}, "grpo", DIAGNOSTICS)
    with pytest.raises(ValueError, match="no runs of treerl"):
        summarise_runs(runs, {"grpo": "GRPO", "treerl": "TreeRL"}, "grpo", DIAGNOSTICS)


def test_a_paired_difference_uses_the_seeds_both_methods_ran():
    runs = [run("treerl", s, f, []) for s, f in [(1, 60.0), (2, 70.0), (3, 80.0)]]
    runs += [run("atb", s, f, []) for s, f in [(2, 75.0), (3, 86.0), (4, 10.0)]]
    paired = paired_final_difference(runs, "atb", "treerl")
    assert paired["n"] == 2 and paired["mean"] == pytest.approx(5.5)  # seeds 2 and 3: +5, +6
    assert paired_final_difference(runs, "treerl", "treerl") is None
    assert paired_final_difference(runs, "grpo", "treerl") is None


def test_the_baseline_reaches_its_own_final_accuracy_at_its_last_point():
    # Finals whose mean (60.3333...) the curve rounds down to 60.33.
    runs = [run("grpo", s, f, [(0, 0, 50), (100, 90 + s, f)]) for s, f in [(1, 60.333), (2, 60.333), (3, 60.334)]]
    out = summarise_runs(runs, {"grpo": "GRPO"}, "grpo", DIAGNOSTICS)
    assert out["grpo"]["tokens_to_baseline_final"] == 92


def test_a_diagnostic_some_run_did_not_record_is_left_out_of_the_summary():
    runs = [run(m, 1, 60.0, [(0, 0, 50), (100, 100, 60)]) for m in ("grpo", "attnrl")]
    runs[1]["diagnostics"]["valid_token_ratio_built"] = [1.0]  # recorded by one run only (an older results file)
    out = summarise_runs(runs, {"grpo": "GRPO", "attnrl": "AttnRL"}, "grpo", (*DIAGNOSTICS, "valid_token_ratio_built"))
    assert set(out["grpo"]["diagnostics"]) == {"valid_token_ratio"}
    assert set(out["attnrl"]["diagnostics"]) == {"valid_token_ratio", "valid_token_ratio_built"}
