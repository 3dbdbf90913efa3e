"""The verifier on every real evaluation benchmark (spec §8, §14).

A response that boxes a problem's own first accepted answer must score 1.0 (checks that
extraction survives real LaTeX, units and whitespace); a response that boxes another
problem's answer must score 0.0 (checks that neither the exact-match path nor Math-Verify
accepts everything). Run with ``pytest -s`` to see the rates.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from attnrl.reward import Verifier

EVAL_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "eval"
MIN_MATCHED_RATE = 0.99
MAX_SHUFFLED_RATE = 0.02
SEED = 20250930


@dataclass(frozen=True)
class Row:
    source: str
    position: int
    answers: tuple[str, ...]


def _load_rows() -> list[Row]:
    files = sorted(EVAL_DIR.glob("*.parquet")) if EVAL_DIR.is_dir() else []
    if not files:
        reason = f"no benchmark parquet files under {EVAL_DIR} (the shared benchmarks folder is absent)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    import pandas as pd

    rows = []
    for path in files:
        frame = pd.read_parquet(path)
        for position, reward_model in enumerate(frame["reward_model"]):
            truth = reward_model["ground_truth"]
            answers = [truth] if isinstance(truth, str) else list(truth)
            rows.append(Row(path.stem, position, tuple(str(a).strip() for a in answers)))
    return rows


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return _load_rows()


@pytest.fixture(scope="module")
def verifier() -> Iterator[Verifier]:
    with Verifier(timeout_s=5.0) as v:
        yield v


def _response(answer: str) -> str:
    return f"... so the answer is \\boxed{{{answer}}}"


def _derangement(n: int, rng: random.Random) -> list[int]:
    # Sattolo's shuffle yields a single n-cycle, so no position maps to itself.
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _rates(rows: list[Row], scores: list[float]) -> tuple[float, dict[str, str]]:
    per_source: dict[str, list[float]] = {}
    for row, score in zip(rows, scores):
        per_source.setdefault(row.source, []).append(score)
    report = {src: f"{sum(s) / len(s):.4f} ({int(sum(s))}/{len(s)})" for src, s in per_source.items()}
    return sum(scores) / len(scores), report


def _misses(rows: list[Row], scores: list[float], want: float, responses: list[str]) -> list[str]:
    return [
        f"{row.source}[{row.position}] answers={row.answers!r} response={resp!r}"
        for row, score, resp in zip(rows, scores, responses)
        if score != want
    ]


def test_own_answer_scores_one(rows: list[Row], verifier: Verifier) -> None:
    responses = [_response(row.answers[0]) for row in rows]
    scores = verifier.score_batch([(resp, row.answers) for resp, row in zip(responses, rows)])
    overall, report = _rates(rows, scores)
    print(f"\nmatched correct rate: overall {overall:.4f} over {len(rows)} problems; per file {report}")
    misses = _misses(rows, scores, 1.0, responses)
    assert overall >= MIN_MATCHED_RATE, f"rate {overall:.4f} < {MIN_MATCHED_RATE}; per file {report}; misses {misses}"


def test_shuffled_answer_scores_zero(rows: list[Row], verifier: Verifier) -> None:
    perm = _derangement(len(rows), random.Random(SEED))
    assert all(perm[i] != i for i in range(len(rows)))
    responses = [_response(rows[perm[i]].answers[0]) for i in range(len(rows))]
    scores = verifier.score_batch([(resp, row.answers) for resp, row in zip(responses, rows)])
    overall, report = _rates(rows, scores)
    print(f"\nshuffled correct rate: overall {overall:.4f} over {len(rows)} problems; per file {report}")
    hits = _misses(rows, scores, 0.0, responses)
    for hit in hits:
        print(f"  accepted a foreign answer: {hit}")
    assert overall <= MAX_SHUFFLED_RATE, f"rate {overall:.4f} > {MAX_SHUFFLED_RATE}; per file {report}; hits {hits}"
