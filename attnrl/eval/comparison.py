"""Methods compared at one token budget over seeds (the learning benchmark's arithmetic).

A run (benchmarks/learning.py) is one method on one seed: held-out mean@K (%) before RL, at evaluation marks
of its generated tokens (``curve``), and after; its costs; its per-step diagnostics. This module picks the
steps a run is evaluated at and summarises runs per method: means with 95 % t intervals over seeds, the
paired difference to a baseline, the mean accuracy curve, and the tokens each method needs to reach the
baseline's final accuracy (spec §15.3's efficiency claim, in tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean
from typing import Any

from attnrl.eval.intervals import mean_interval, paired_difference

COSTS = ("generated_tokens", "overshoot", "trained_tokens", "valid_tokens", "steps", "optimizer_steps", "train_s")


def marks(budget: int, every: int) -> list[int]:
    """Token counts at which the policy is evaluated: every ``every`` tokens, the budget last."""
    if every < 1 or budget < 1:
        raise ValueError(f"budget and evaluation interval must be positive, got {budget} and {every}")
    return [*range(every, budget, every), budget]


def curve_points(rows: Sequence[dict[str, float]], budget: int, every: int) -> list[tuple[int, int]]:
    """(mark, step) per mark below the budget: the first step whose cumulative tokens reach it. A step that
    reaches several marks is evaluated once, at the first; marks first reached by the last step are left out:
    the final policy is the budget's point."""
    out: list[tuple[int, int]] = []
    for mark in marks(budget, every)[:-1]:
        step = next((int(r["step"]) for r in rows if r["total_generated_tokens"] >= mark), None)
        if step is not None and step < len(rows) and all(step != s for _, s in out):
            out.append((mark, step))
    return out


def mean_curve(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy per evaluation mark over seeds, at the marks every run has a point at."""
    curve = []
    for mark in sorted({p["mark"] for r in runs for p in r["curve"]}):
        points = [p for r in runs for p in r["curve"] if p["mark"] == mark]
        if len(points) == len(runs):
            curve.append({"mark": mark, "tokens": round(fmean(p["tokens"] for p in points)),
                          "accuracy": mean_interval([p["average"] for p in points])})
    return curve


def tokens_to_reach(curve: Sequence[dict[str, Any]], threshold: float) -> int | None:
    """Generated tokens at which the mean curve first reaches ``threshold`` (linear between points); None: never."""
    for a, b in zip(curve, curve[1:]):
        low, high = a["accuracy"]["mean"], b["accuracy"]["mean"]
        if low >= threshold:
            return a["tokens"]
        if high >= threshold:
            return round(a["tokens"] + (threshold - low) / (high - low) * (b["tokens"] - a["tokens"]))
    return None


def paired_final_difference(runs: Sequence[dict[str, Any]], name: str, baseline: str) -> dict[str, Any] | None:
    """``name``'s final accuracy minus ``baseline``'s, paired by seed over the seeds both ran; None for the
    baseline itself or when they share no seed."""
    mine = {r["seed"]: r["final"] for r in runs if r["method"] == name}
    base = {r["seed"]: r["final"] for r in runs if r["method"] == baseline}
    seeds = sorted(set(mine) & set(base))
    if name == baseline or not seeds:
        return None
    return paired_difference([mine[s] for s in seeds], [base[s] for s in seeds])


def summarise_runs(runs: Sequence[dict[str, Any]], labels: dict[str, str], baseline: str,
                   diagnostics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method (``labels``' order) over seeds: final accuracy, improvement, paired difference to
    ``baseline`` (same seeds), costs, the mean curve, the tokens to the baseline's final accuracy and the
    diagnostics' means over steps (those every run recorded: a results file from before a diagnostic was
    added still summarises)."""
    by = {name: sorted((r for r in runs if r["method"] == name), key=lambda r: r["seed"]) for name in labels}
    if empty := [name for name, rs in by.items() if not rs]:
        raise ValueError(f"no runs of {', '.join(empty)}")
    base = by.get(baseline)
    # The baseline's final mean as its curve rounds it: otherwise a mean that rounds down is never reached,
    # not even by the baseline's own curve.
    threshold = mean_interval([r["final"] for r in base])["mean"] if base else None
    out = {}
    for name, rs in by.items():
        if base and [r["seed"] for r in rs] != [r["seed"] for r in base]:
            raise ValueError(f"{name} ran on seeds {[r['seed'] for r in rs]}, {baseline} on {[r['seed'] for r in base]}")
        curve = mean_curve(rs)
        out[name] = {
            "label": labels[name],
            "lr": rs[0]["lr"],
            "final": mean_interval([r["final"] for r in rs]),
            "improvement": mean_interval([r["improvement"] for r in rs]),
            "baseline": baseline,
            "vs_baseline": paired_final_difference(runs, name, baseline),
            "curve": curve,
            "tokens_to_baseline_final": None if threshold is None else tokens_to_reach(curve, threshold),
            **{key: mean_interval([r[key] for r in rs], 1) for key in COSTS},
            "max_overshoot": max(r["overshoot"] for r in rs),
            "diagnostics": {key: mean_interval([fmean(r["diagnostics"][key]) for r in rs], 4) for key in diagnostics
                            if all(key in r["diagnostics"] for r in rs)},
        }
    return out
