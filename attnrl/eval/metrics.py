"""mean@K and pass@K per benchmark, and the unweighted average over benchmarks (spec §14).

mean@K (the paper's Pass@1 / Avg@K) averages the 0/1 reward over a problem's K samples, then
over problems; pass@K takes each problem's best sample, then averages. The "Avg." column is
the plain mean of the per-benchmark numbers, whatever their sizes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SampleResult:
    """One graded sample: which benchmark and problem it answers, and its reward in {0, 1}."""

    benchmark: str
    problem_id: str
    reward: float


@dataclass(frozen=True)
class BenchmarkScore:
    benchmark: str
    problems: int
    k: int
    mean_at_k: float
    pass_at_k: float


def benchmark_scores(results: Iterable[SampleResult]) -> list[BenchmarkScore]:
    """Scores per benchmark, sorted by name. Every problem of a benchmark must have the same K."""
    rewards: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        if result.reward not in (0.0, 1.0):
            raise ValueError(f"{result.benchmark}/{result.problem_id}: reward must be 0 or 1, got {result.reward}")
        rewards[result.benchmark][result.problem_id].append(result.reward)
    scores = []
    for benchmark in sorted(rewards):
        per_problem = rewards[benchmark]
        ks = {len(samples) for samples in per_problem.values()}
        if len(ks) != 1:
            raise ValueError(f"{benchmark}: problems have different sample counts {sorted(ks)}; K must be equal")
        scores.append(
            BenchmarkScore(
                benchmark=benchmark,
                problems=len(per_problem),
                k=ks.pop(),
                mean_at_k=sum(sum(s) / len(s) for s in per_problem.values()) / len(per_problem),
                pass_at_k=sum(max(s) for s in per_problem.values()) / len(per_problem),
            )
        )
    return scores


def summarise(scores: list[BenchmarkScore]) -> dict[str, object]:
    """A JSON-ready summary: per-benchmark scores plus their unweighted average."""
    if not scores:
        raise ValueError("no benchmark scores to summarise")
    return {
        "benchmarks": [asdict(s) for s in scores],
        "average": {
            "mean_at_k": sum(s.mean_at_k for s in scores) / len(scores),
            "pass_at_k": sum(s.pass_at_k for s in scores) / len(scores),
        },
    }


def format_table(scores: list[BenchmarkScore]) -> str:
    """A plain-text table for terminals and logs."""
    summary = summarise(scores)
    lines = [f"{'benchmark':<24} {'problems':>8} {'K':>4} {'mean@K':>8} {'pass@K':>8}"]
    for s in scores:
        lines.append(f"{s.benchmark:<24} {s.problems:>8} {s.k:>4} {100 * s.mean_at_k:>7.1f}% {100 * s.pass_at_k:>7.1f}%")
    avg = summary["average"]
    lines.append(f"{'average':<24} {'':>8} {'':>4} {100 * avg['mean_at_k']:>7.1f}% {100 * avg['pass_at_k']:>7.1f}%")
    return "\n".join(lines)
