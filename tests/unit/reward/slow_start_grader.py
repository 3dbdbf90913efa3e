"""A grading function whose child takes 2 s to start (a cold import of a large grader), for the test
that the hard timeout counts from the job's hand-over, not from the child's start (spec §8)."""

from __future__ import annotations

import time

START_S = 2.0


def warm_up() -> None:
    """Run in the child before it reports ready: busy for ``START_S`` (tests must not sleep)."""
    end = time.monotonic() + START_S
    while time.monotonic() < end:
        pass


def grade(solution: str, pred: str | None, answers: list[str]) -> bool:
    return "RIGHT" in solution
