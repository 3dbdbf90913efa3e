"""Misbehaving grading functions for the verifier's hard-timeout tests (spec §8).

They run inside the verifier's spawned child, so they are named by import path
(``"tests.unit.reward.hanging_grader:grade"``) and must live at module level. They burn CPU
instead of sleeping, because a hung sympy call is a busy loop that no signal-based timeout
in the main thread can interrupt, and tests must not sleep.
"""

from __future__ import annotations

import os


def grade(solution: str, pred: str | None, answers: list[str]) -> bool:
    """Never return."""
    while True:
        pass


def grade_or_hang(solution: str, pred: str | None, answers: list[str]) -> bool:
    """Hang on a solution containing ``HANG``; otherwise correct iff it contains ``RIGHT``."""
    if "HANG" in solution:
        while True:
            pass
    return "RIGHT" in solution


def grade_or_crash(solution: str, pred: str | None, answers: list[str]) -> bool:
    """Kill the whole child on ``CRASH`` (as a segfault or the OOM killer would); else as above."""
    if "CRASH" in solution:
        os._exit(3)
    return "RIGHT" in solution


def grade_or_raise(solution: str, pred: str | None, answers: list[str]) -> bool:
    """Raise on ``RAISE``; otherwise correct iff the solution contains ``RIGHT``."""
    if "RAISE" in solution:
        raise ValueError("grader failure")
    return "RIGHT" in solution
