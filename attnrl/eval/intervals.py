"""Means with 95 % confidence intervals over seeds, and paired differences (results that carry a claim).

Not in the paper, which reports one run per method (spec §15). A benchmark runs every method on the same seeds
(the same warmed-up policy and prompt order per seed), so a comparison between two methods is the mean of the
per-seed differences, with a Student-t interval on n − 1 degrees of freedom: it removes the seed-to-seed
variation the two methods share.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from statistics import fmean, stdev

from scipy.stats import t as student_t

CONFIDENCE = 0.95


def mean_interval(values: Sequence[float], digits: int = 2) -> dict[str, object]:
    """``{"mean", "ci95": [low, high], "n"}``; the interval is None for fewer than two values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value")
    mean = fmean(values)
    if len(values) < 2:
        return {"mean": round(mean, digits), "ci95": None, "n": len(values)}
    half = student_t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * stdev(values) / math.sqrt(len(values))
    return {"mean": round(mean, digits), "ci95": [round(mean - half, digits), round(mean + half, digits)],
            "n": len(values)}


def paired_difference(values: Sequence[float], baseline: Sequence[float], digits: int = 2) -> dict[str, object]:
    """The mean of ``values[i] - baseline[i]`` (the same seed i) with its interval, and whether it excludes 0."""
    if len(values) != len(baseline):
        raise ValueError(f"paired values differ in length: {len(values)} and {len(baseline)}")
    out = mean_interval([a - b for a, b in zip(values, baseline, strict=True)], digits)
    low_high = out["ci95"]
    out["excludes_zero"] = None if low_high is None else bool(low_high[0] > 0 or low_high[1] < 0)
    return out


BOOTSTRAP_SAMPLES = 1000


def ratio_interval(per_unit: Sequence[tuple[float, float]], rng: random.Random, digits: int = 4) -> dict[str, object]:
    """``sum(numerators) / sum(denominators)`` over units (problems) with a 95 % percentile bootstrap interval
    that resamples the units: ``{"value", "ci95", "n"}`` (n: the denominators' sum)."""
    def ratio(units: Sequence[tuple[float, float]]) -> float:
        total = sum(d for _, d in units)
        return sum(n for n, _ in units) / total if total else 0.0

    draws = sorted(ratio([per_unit[rng.randrange(len(per_unit))] for _ in per_unit]) for _ in range(BOOTSTRAP_SAMPLES))
    low, high = draws[int((1 - CONFIDENCE) / 2 * BOOTSTRAP_SAMPLES)], draws[int((1 + CONFIDENCE) / 2 * BOOTSTRAP_SAMPLES) - 1]
    total = sum(d for _, d in per_unit)
    return {"value": round(ratio(per_unit), digits), "ci95": [round(low, digits), round(high, digits)],
            "n": int(total) if float(total).is_integer() else round(total, digits)}
