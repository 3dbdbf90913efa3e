"""Answer extraction and normalisation (spec §8 steps 2-4)."""

from __future__ import annotations

import pytest

from attnrl.reward import extract_solution, last_boxed
from attnrl.reward.extract import normalise_answer


class TestExtractSolution:
    def test_text_after_last_think_end(self) -> None:
        response = "draft \\boxed{1} </think> more </think> final \\boxed{2}"
        assert extract_solution(response) == " final \\boxed{2}"

    def test_whole_text_without_think_end(self) -> None:
        assert extract_solution("just \\boxed{3}") == "just \\boxed{3}"

    def test_nothing_after_think_end(self) -> None:
        assert extract_solution("thinking \\boxed{3}</think>") == ""


class TestLastBoxed:
    def test_takes_last_box(self) -> None:
        assert last_boxed("\\boxed{1} then \\boxed{2}") == "2"

    def test_nested_braces(self) -> None:
        assert last_boxed("so $\\boxed{\\frac{\\pi}{2}}$.") == "\\frac{\\pi}{2}"

    def test_deeply_nested(self) -> None:
        assert last_boxed("\\boxed{\\left( 3, \\frac{\\pi}{\\sqrt{2}} \\right)}") == (
            "\\left( 3, \\frac{\\pi}{\\sqrt{2}} \\right)"
        )

    def test_escaped_braces_are_literal(self) -> None:
        assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
        assert last_boxed("\\boxed{\\left\\{ x \\right.}") == "\\left\\{ x \\right."

    def test_unclosed_last_box_is_none(self) -> None:
        assert last_boxed("\\boxed{1} and then \\boxed{\\frac{1}{2}") is None

    def test_no_box_is_none(self) -> None:
        assert last_boxed("the answer is 5") is None
        assert last_boxed("") is None

    def test_bare_mention_is_not_a_box(self) -> None:
        assert last_boxed("use \\boxed{4}, not \\boxed.") == "4"

    def test_fbox(self) -> None:
        assert last_boxed("\\fbox{7}") == "7"
        assert last_boxed("\\boxed{1} \\fbox{x^{2}}") == "x^{2}"

    def test_space_then_single_token(self) -> None:
        assert last_boxed("so $\\boxed 5$ is it") == "5"
        assert last_boxed("\\boxed 12 apples") == "12"

    def test_other_command_starting_with_boxed_is_ignored(self) -> None:
        assert last_boxed("\\boxedsymbol{3}") is None

    def test_surrounding_space_inside_box_is_stripped(self) -> None:
        assert last_boxed("\\boxed{ 42 }") == "42"


class TestNormaliseAnswer:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("  42 ", "42"),
            ("$42$", "42"),
            ("9.6\n", "9.6"),
            ("\\left( 3, \\frac{\\pi}{2} \\right)", "( 3, \\frac{\\pi}{2} )"),
            ("a  +\n b", "a + b"),
            ("5.", "5"),
            ("x \\rightarrow y", "x \\rightarrow y"),
            ("\\leftarrow", "\\leftarrow"),
            ("1, 2, ...", "1, 2, ..."),
        ],
    )
    def test_spelling(self, raw: str, expected: str) -> None:
        assert normalise_answer(raw) == expected

    @pytest.mark.parametrize(
        ("a", "b"),
        [("1,000", "1000"), ("1 000", "1000"), ("-3", "3"), ("0.5", "5"), ("025", "25"), ("3.5", "35"), ("1.5", "15.")],
    )
    def test_never_merges_different_strings_of_numbers(self, a: str, b: str) -> None:
        # Different spellings go to Math-Verify; only a false *positive* here would be a bug.
        assert normalise_answer(a) != normalise_answer(b)
