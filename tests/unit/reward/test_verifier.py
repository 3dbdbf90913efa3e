"""The verifier's scoring rules and its hard per-response timeout (spec §8)."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import signal
from collections.abc import Iterator

import pytest

from attnrl.errors import ConfigError, DataError
from attnrl.reward import Verifier

HELPERS = "tests.unit.reward.hanging_grader"


@pytest.fixture(scope="module")
def verifier() -> Iterator[Verifier]:
    # Generous limit: these tests check grading rules, not speed, on a possibly loaded machine.
    with Verifier(timeout_s=30.0) as v:
        yield v


def _answer(text: str) -> str:
    return f"Let me think.</think>So the answer is $\\boxed{{{text}}}$."


class TestScoringRules:
    def test_correct_integer(self, verifier: Verifier) -> None:
        assert verifier.score(_answer("42"), ["42"]) == 1.0

    def test_incorrect_integer(self, verifier: Verifier) -> None:
        assert verifier.score(_answer("41"), ["42"]) == 0.0

    @pytest.mark.parametrize(
        ("pred", "gold"), [("\\frac12", "0.5"), ("\\frac12", "\\frac{1}{2}"), ("0.5", "\\frac{1}{2}")]
    )
    def test_equivalent_forms_via_math_verify(self, verifier: Verifier, pred: str, gold: str) -> None:
        assert verifier.score(_answer(pred), [gold]) == 1.0

    def test_inequivalent_fraction(self, verifier: Verifier) -> None:
        assert verifier.score(_answer("\\frac13"), ["0.5"]) == 0.0

    def test_any_of_several_accepted_answers(self, verifier: Verifier) -> None:
        answers = ["12", "\\frac{3}{4}"]
        assert verifier.score(_answer("0.75"), answers) == 1.0
        assert verifier.score(_answer("12"), answers) == 1.0
        assert verifier.score(_answer("13"), answers) == 0.0
        # An integer prediction against integers and a fraction: Math-Verify decides (6/2 is 3), not the integer path.
        assert verifier.score(_answer("3"), ["4", "\\frac{6}{2}"]) == 1.0

    def test_single_string_ground_truth(self, verifier: Verifier) -> None:
        assert verifier.score(_answer("7"), "7\n") == 1.0

    def test_ground_truth_containing_boxed(self, verifier: Verifier) -> None:
        answers = ["The answer is $\\boxed{\\frac{\\pi}{2}}$."]
        assert verifier.score(_answer("\\frac{\\pi}{2}"), answers) == 1.0
        assert verifier.score(_answer("\\pi/2"), answers) == 1.0
        assert verifier.score(_answer("\\pi"), answers) == 0.0

    def test_unboxed_solution_is_parsed_whole(self, verifier: Verifier) -> None:
        assert verifier.score("</think>The answer is $\\frac{1}{2}$.", ["0.5"]) == 1.0

    def test_empty_response(self, verifier: Verifier) -> None:
        assert verifier.score("", ["0"]) == 0.0

    def test_nothing_after_think_end(self, verifier: Verifier) -> None:
        assert verifier.score("I get \\boxed{3}</think>", ["3"]) == 0.0
        assert verifier.score("</think>   \n", ["3"]) == 0.0

    def test_box_inside_thinking_does_not_count(self, verifier: Verifier) -> None:
        assert verifier.score("\\boxed{3}</think>final: \\boxed{4}", ["3"]) == 0.0
        assert verifier.score("\\boxed{4}</think>final: \\boxed{3}", ["3"]) == 1.0

    def test_batch_keeps_order(self, verifier: Verifier) -> None:
        items = [(_answer("1"), ["1"]), (_answer("2"), ["3"]), ("", ["1"]), (_answer("\\frac12"), ["0.5"])]
        assert verifier.score_batch(items) == [1.0, 0.0, 0.0, 1.0]

    def test_non_string_ground_truth_is_rejected(self, verifier: Verifier) -> None:
        with pytest.raises(DataError, match="item 0"):
            verifier.score(_answer("1"), [1])  # type: ignore[list-item]


class TestConstruction:
    @pytest.mark.parametrize("timeout_s", [0, -1.0, float("inf"), float("nan")])
    def test_bad_timeout(self, timeout_s: float) -> None:
        with pytest.raises(ConfigError):
            Verifier(timeout_s)

    @pytest.mark.parametrize("workers", [0, 1.5, True])
    def test_bad_workers(self, workers: int) -> None:
        with pytest.raises(ConfigError):
            Verifier(1.0, workers)

    @pytest.mark.parametrize("path", ["no_colon", "tests.unit.reward.missing_module:grade", f"{HELPERS}:missing"])
    def test_bad_grade_fn(self, path: str) -> None:
        with pytest.raises(ConfigError):
            Verifier(1.0, grade_fn=path)

    def test_closed_verifier_refuses_work(self) -> None:
        v = Verifier(1.0)
        v.close()
        v.close()
        with pytest.raises(ConfigError, match="closed"):
            v.score(_answer("1"), ["1"])


class TestHardTimeout:
    def test_fast_path_starts_no_child(self) -> None:
        before = set(multiprocessing.active_children())
        with Verifier(1.0, grade_fn=f"{HELPERS}:grade") as v:
            assert v.score_batch([(_answer("5"), ["5"]), ("", ["5"]), ("x</think>", ["5"])]) == [1.0, 0.0, 0.0]
            assert v.children_started == 0
            assert set(multiprocessing.active_children()) == before

    def test_hung_item_scores_zero_and_verifier_stays_usable(self, caplog: pytest.LogCaptureFixture) -> None:
        before = set(multiprocessing.active_children())
        with caplog.at_level(logging.WARNING), Verifier(timeout_s=1.0, grade_fn=f"{HELPERS}:grade") as v:
            scores = v.score_batch([(_answer("5"), ["5"]), (_answer("x+1"), ["5"]), (_answer("7"), ["7"])])
            assert scores == [1.0, 0.0, 1.0]
            assert "response 1" in caplog.text and "timeout" in caplog.text
            # A fresh child is started for the next item that needs one.
            assert v.score_batch([(_answer("8"), ["8"]), (_answer("y"), ["10"])]) == [1.0, 0.0]
            assert v.children_started == 2
        assert set(multiprocessing.active_children()) == before

    def test_fresh_child_grades_after_a_hang(self) -> None:
        with Verifier(timeout_s=1.0, grade_fn=f"{HELPERS}:grade_or_hang") as v:
            items = [(_answer("HANG"), ["1"]), (_answer("RIGHT"), ["1"]), (_answer("wrong"), ["1"])]
            assert v.score_batch(items) == [0.0, 1.0, 0.0]
            assert v.children_started == 2

    def test_several_workers(self) -> None:
        before = set(multiprocessing.active_children())
        with Verifier(timeout_s=1.0, workers=2, grade_fn=f"{HELPERS}:grade_or_hang") as v:
            items = [(_answer("HANG"), ["1"])]
            items += [(_answer(f"RIGHT{i}"), ["1"]) for i in range(4)] + [(_answer("1"), ["1"])]
            assert v.score_batch(items) == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
        assert set(multiprocessing.active_children()) == before

    def test_the_timeout_counts_from_the_hand_over_not_from_the_childs_start(self) -> None:
        # The child takes 2 s to start, longer than the 1 s timeout; grading itself is instant.
        with Verifier(timeout_s=1.0, grade_fn="tests.unit.reward.slow_start_grader:grade") as v:
            assert v.score(_answer("RIGHT"), ["1"]) == 1.0
            assert v.children_started == 1

    def test_an_interrupted_batch_stops_its_busy_child_and_the_next_batch_is_graded_right(self) -> None:
        before = set(multiprocessing.active_children())

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            with Verifier(timeout_s=30.0, grade_fn=f"{HELPERS}:grade_or_hang") as v:
                assert v.score(_answer("RIGHT"), ["1"]) == 1.0  # the child is up and idle
                signal.setitimer(signal.ITIMER_REAL, 1.0)  # Ctrl-C while the child hangs on the next batch
                with pytest.raises(KeyboardInterrupt):
                    v.score_batch([(_answer("HANG"), ["1"])])
                assert set(multiprocessing.active_children()) == before  # the busy child was stopped
                # A fresh child grades the next batch: no answer of the interrupted one is read as its result.
                assert v.score_batch([(_answer("wrong"), ["1"]), (_answer("RIGHT"), ["1"])]) == [0.0, 1.0]
                assert v.children_started == 2
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def test_crashed_child_scores_zero_and_is_replaced(self, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.WARNING), Verifier(timeout_s=30.0, grade_fn=f"{HELPERS}:grade_or_crash") as v:
            items = [(_answer("RIGHT"), ["1"]), (_answer("CRASH"), ["1"]), (_answer("RIGHT"), ["1"])]
            assert v.score_batch(items) == [1.0, 0.0, 1.0]
            assert "response 1" in caplog.text

    def test_grader_exception_scores_zero(self) -> None:
        with Verifier(timeout_s=30.0, grade_fn=f"{HELPERS}:grade_or_raise") as v:
            items = [(_answer("RAISE"), ["1"]), (_answer("RIGHT"), ["1"])]
            assert v.score_batch(items) == [0.0, 1.0]
            assert v.children_started == 1

    def test_child_stopped_when_verifier_is_dropped(self) -> None:
        before = set(multiprocessing.active_children())
        v = Verifier(timeout_s=30.0, grade_fn=f"{HELPERS}:grade_or_raise")
        assert v.score(_answer("RIGHT"), ["1"]) == 1.0
        assert len(set(multiprocessing.active_children()) - before) == 1
        del v
        gc.collect()
        assert set(multiprocessing.active_children()) == before


def test_integer_answers_are_settled_without_a_grading_process():
    with Verifier(timeout_s=5.0) as verifier:
        # The last ground truth is settled by its boxed content.
        scores = verifier.score_batch([("\\boxed{5}", ["4"]), ("\\boxed{004}", ["4"]), ("\\boxed{+7}", ["1", "7"]),
                                       ("\\boxed{7}", ["The answer is $\\boxed{7}$."])])
        assert scores == [0.0, 1.0, 1.0, 1.0]
        assert verifier.children_started == 0


def test_scripts_without_a_main_guard_can_grade(tmp_path) -> None:
    # The grading child must not re-run the parent's script (spawn re-imports __main__ by default).
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(
        "from attnrl.reward import Verifier\n"
        "with Verifier(timeout_s=5.0) as v:\n"
        "    print('score', v.score('so \\\\boxed{\\\\frac12}', ['0.5']))\n"
    )
    for command in ([sys.executable, str(script)], [sys.executable, "-"]):
        stdin = script.read_text() if command[-1] == "-" else None
        out = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["score 1.0"]


HUGE = "9" * 20_000  # past int()'s 4,300-digit limit
ADVERSARIAL = [
    # (model output, ground truth, the score it must get)
    (_answer(HUGE), HUGE, 1.0),
    (_answer("0" * 5000 + HUGE), HUGE, 1.0),
    (_answer("-" + HUGE), HUGE, 0.0),
    (_answer(HUGE), "42", 0.0),
    (_answer(HUGE + "1"), HUGE, 0.0),
    (_answer("-0"), "0", 1.0),
    (_answer(HUGE), "\\frac{1}{2}", 0.0),                        # a huge integer against a fraction
    (_answer("9^{9^{9^{9^{9^{9^{9^{9}}}}}}}"), "3", 0.0),          # a power tower nobody can evaluate
    (_answer("{" * 3000 + "1" + "}" * 3000), "1", None),          # deep nesting: right or wrong, no crash
    (_answer("x" * 300_000), "7", 0.0),
    ("\\boxed{" * 20_000, "1", 0.0),                              # unbalanced: boxes that never close
    ("}}}}\\boxed{{{1}", "1", 0.0),
    ("", "1", 0.0),
    ("   \n\t  ", "1", 0.0),
    (_answer(""), "1", 0.0),
    (_answer("\x00\x07\x1b[31m5"), "5", None),                    # control characters
    ("\x00" * 10_000, "0", 0.0),
    (_answer("٣"), "3", None),                                    # a non-ASCII digit goes to Math-Verify
]


def test_no_model_output_crashes_or_hangs_grading():
    """Every entry gets 0 or 1 (the expected one where it is fixed) from one batch that never raises; a
    response that hangs Math-Verify is cut off by the hard timeout and scores 0."""
    with Verifier(timeout_s=3.0) as verifier:
        scores = verifier.score_batch([(output, [truth]) for output, truth, _ in ADVERSARIAL])
    assert all(score in (0.0, 1.0) for score in scores), scores
    wrong = [(output[:40], expected, got) for (output, _, expected), got in zip(ADVERSARIAL, scores, strict=True)
             if expected is not None and got != expected]
    assert wrong == []
