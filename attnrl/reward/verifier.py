"""The rule-based answer verifier: 1.0 if the final answer is right, else 0.0 (spec §8).

Per response (spec §8 steps 1-6, as adopted by this project):

1. An empty response is wrong.
2. The solution is the text after the last ``</think>`` (the whole text if there is none).
3. Ground truths are stripped; one that itself contains ``\\boxed`` contributes its boxed content.
4. The prediction is the content of the solution's last ``\\boxed{...}``. If it equals a ground
   truth after ``normalise_answer``, the response is right, without any subprocess.
5. Otherwise Math-Verify decides: ``verify(parse("\\boxed{gt}"), parse("\\boxed{pred}"))`` for
   any ground truth, or ``parse(solution)`` when nothing is boxed. This runs in a child process
   with a hard timeout (see ``worker.py``); a timeout or error means wrong.

The released code layers a DeepScaleR/Hendrycks string grader before Math-Verify; here the
exact-match path plus Math-Verify stand in for it, and no hand-written symbolic grader exists.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from attnrl.errors import ConfigError, DataError
from attnrl.reward.extract import extract_solution, last_boxed, normalise_answer
from attnrl.reward.worker import GradeJob, GraderPool

DEFAULT_GRADE_FN = "attnrl.reward.verifier:math_verify_grade"
# ASCII digits only: other Unicode digits go to Math-Verify.
_INTEGER = re.compile(r"[-+]?[0-9]+")


def math_verify_grade(solution: str, pred: str | None, answers: list[str]) -> bool:
    """Math-Verify step of spec §8 (step 5): is ``pred`` (or ``solution``) equal to any answer?

    Runs inside a grading child process. ``pred`` is the boxed prediction, re-boxed so that
    Math-Verify parses exactly that expression; without one the whole solution is parsed
    and Math-Verify picks the answer itself. A ground truth whose parse or comparison raises
    counts as not matching.
    """
    from math_verify import parse, verify

    try:
        predicted = parse(f"\\boxed{{{pred}}}") if pred is not None else parse(solution)
    except Exception:  # noqa: BLE001 - spec §8: an unparsable prediction is simply wrong
        return False
    if not predicted:
        return False
    for answer in answers:
        try:
            gold = parse(f"\\boxed{{{answer}}}")
            if gold and verify(gold, predicted):
                return True
        except Exception:  # noqa: BLE001 - spec §8: exceptions skip that ground truth
            continue
    return False


def warm_up() -> None:
    """Import Math-Verify and exercise it once, in a fresh grading child (see ``worker.py``).

    The first call pays for importing sympy and building the LaTeX parser; doing it before the
    child reports ready keeps that cost out of the first response's timeout.
    """
    math_verify_grade("", "1", ["1"])


class Verifier:
    """Scores responses against accepted answers with a hard timeout per response (spec §8).

    Args:
        timeout_s: wall-clock limit for the Math-Verify step of one response (the released run
            uses 5 s). Past it the response scores 0.0 and its grading process is replaced.
        workers: number of grading child processes, used concurrently within a batch.
        grade_fn: ``"module:function"`` run in the children for step 5; injectable for tests.
            It receives ``(solution, pred, answers)`` and returns a truthy value if correct.
        startup_timeout_s: how long a fresh child may take to import and warm up.

    Children start on the first response that needs Math-Verify, so a batch settled by the
    exact-match path starts none. Use as a context manager or call ``close()``; the children
    never outlive the verifier. Not thread-safe.
    """

    def __init__(
        self,
        timeout_s: float,
        workers: int = 1,
        *,
        grade_fn: str = DEFAULT_GRADE_FN,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ConfigError(f"Verifier timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"Verifier workers must be an integer >= 1, got {workers!r}")
        if not (isinstance(startup_timeout_s, (int, float)) and startup_timeout_s > 0):
            raise ConfigError(f"Verifier startup_timeout_s must be positive, got {startup_timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.workers = workers
        self._pool: GraderPool | None = GraderPool(grade_fn, workers, self.timeout_s, float(startup_timeout_s))

    @property
    def children_started(self) -> int:
        """How many grading processes were started so far (the first, plus one per restart)."""
        return self._pool.children_started if self._pool is not None else 0

    def score(self, response: str, answers: Sequence[str] | str) -> float:
        """Score one response: 1.0 if its final answer matches any of ``answers``, else 0.0 (spec §8)."""
        return self.score_batch([(response, answers)])[0]

    def score_batch(self, items: Sequence[tuple[str, Sequence[str] | str]]) -> list[float]:
        """Score ``(response, answers)`` pairs; the result is aligned with ``items`` (spec §8).

        Warnings about timeouts name the item's position in ``items``.
        """
        if self._pool is None:
            raise ConfigError("Verifier is closed; create a new one")
        scores = [0.0] * len(items)
        jobs: list[tuple[int, GradeJob]] = []
        for index, (response, answers) in enumerate(items):
            decided = _decide_without_math_verify(response, _ground_truths(answers, index))
            if isinstance(decided, float):
                scores[index] = decided
            else:
                jobs.append((index, decided))
        if jobs:
            for index, correct in self._pool.grade(jobs).items():
                scores[index] = 1.0 if correct else 0.0
        return scores

    def close(self) -> None:
        """Stop the grading processes. Idempotent."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A verifier dropped without close() must still not leave children behind.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing useful to do during garbage collection
            pass


def _ground_truths(answers: Sequence[str] | str | Any, index: int) -> list[str]:
    # Train files hold one string, eval files a list of accepted forms (spec §2.3, §8 step 3).
    if isinstance(answers, str):
        answers = [answers]
    cleaned = []
    for answer in answers:
        if not isinstance(answer, str):
            raise DataError(f"item {index}: ground truth must be a string, got {type(answer).__name__} {answer!r}")
        answer = answer.strip()
        if "\\boxed" in answer or "\\fbox" in answer:
            answer = last_boxed(answer) or answer
        if answer:
            cleaned.append(answer)
    return cleaned


def _decide_without_math_verify(response: str, answers: list[str]) -> float | GradeJob:
    """Spec §8 steps 1-4: a final score where strings settle it, else the Math-Verify job."""
    if not response or not answers:
        return 0.0
    solution = extract_solution(response)
    if not solution.strip():
        return 0.0
    pred = last_boxed(solution)
    if pred is not None:
        key = normalise_answer(pred)
        if key and any(key == normalise_answer(answer) for answer in answers):
            return 1.0
        # Two plain integers that differ as strings differ as numbers: no need to ask Math-Verify
        # (this settles nearly every wrong answer of the synthetic task without a subprocess).
        if _INTEGER.fullmatch(key) and all(_INTEGER.fullmatch(normalise_answer(a)) for a in answers):
            return 1.0 if any(_integer_value(key) == _integer_value(normalise_answer(a)) for a in answers) else 0.0
    return (solution, pred, answers)


def _integer_value(text: str) -> str:
    """A plain integer's canonical spelling (no sign for zero, no leading zeros), compared as a string:
    ``int()`` refuses more than 4,300 digits, and a model can box any number of them."""
    digits = text.lstrip("+-").lstrip("0") or "0"
    return digits if digits == "0" or not text.startswith("-") else "-" + digits
