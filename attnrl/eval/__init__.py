"""Evaluation metrics: mean@K and pass@K per benchmark and their unweighted average (spec §14)."""

from attnrl.eval.metrics import BenchmarkScore, SampleResult, benchmark_scores, format_table, summarise

__all__ = ["BenchmarkScore", "SampleResult", "benchmark_scores", "format_table", "summarise"]
