from __future__ import annotations

import numpy as np
import pytest

from attnrl.data.problem import make_problem
from attnrl.errors import DataError


def _make(**changes):
    fields = {"id": 3, "prompt": "What is 1+1?", "answers": ["2"], "source": "toy", "split": "test", "where": "f.parquet row 3"}
    fields.update(changes)
    return make_problem(**fields)


def test_strings_become_one_user_message_and_answers_are_stripped():
    problem = _make(answers=np.array(["9.6\n", " \\frac{1}{2} "]))
    assert problem.prompt == ({"role": "user", "content": "What is 1+1?"},)
    assert problem.answers == ("9.6", "\\frac{1}{2}")
    assert (problem.id, problem.uid, problem.question) == ("3", "toy/3", "What is 1+1?")


def test_a_single_string_answer_is_accepted():
    assert _make(answers="  42 ").answers == ("42",)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "   "}, "prompt' is empty"),
        ({"prompt": []}, "non-empty list"),
        ({"prompt": [{"role": "user", "content": ""}]}, "prompt' is empty"),
        ({"prompt": "\x00\x01\x02"}, "field 'prompt' has no text, only control characters ('\\x00\\x01\\x02')"),
        ({"prompt": " \u200b\u200d\x1b "}, "field 'prompt' has no text, only control characters"),
        ({"prompt": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        ({"prompt": [{"role": "user"}]}, "'role' and 'content'"),
        ({"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "user turn"),
        ({"answers": [7]}, "answer 0 must be a string, got int"),
        ({"answers": ["1", None]}, "answer 1 must be a string"),
        ({"answers": []}, "non-empty list"),
        ({"answers": [" \n"]}, "answer 0 is empty"),
        ({"answers": ["4", "\x07"]}, "answer 1 has no text, only control characters ('\\x07')"),
        ({"answers": None}, "field 'answers'"),
        ({"id": None}, "field 'id'"),
        ({"source": ""}, "field 'source'"),
        ({"level": "hard"}, "field 'level'"),
    ],
)
def test_bad_fields_are_errors_naming_the_row_and_field(changes, message):
    with pytest.raises(DataError) as info:
        _make(**changes)
    assert "f.parquet row 3" in str(info.value)
    assert message in str(info.value)
