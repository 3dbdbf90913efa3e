from __future__ import annotations

import pytest

from attnrl.rollout.balance import assign_by_tokens, token_load
from attnrl.rollout.engine import GenerationRequest


def _request(prompt_len, n=1, limit=None, group=None):
    return GenerationRequest(tuple(range(1, prompt_len + 1)), n=n, max_new_tokens=limit, group=group)


def test_load_is_samples_times_prompt_plus_limit():
    assert token_load(_request(10, n=3, limit=5), max_new_tokens=100) == 3 * 15
    assert token_load(_request(10, n=2), max_new_tokens=100) == 2 * 110


def test_a_questions_requests_stay_together_and_engines_balance_by_tokens():
    # Question "a" has one long continuation-heavy group; "b" and "c" are small: by count a
    # round-robin split would give engine 0 most of the tokens.
    requests = [_request(50, n=2, limit=100, group="a"), _request(50, n=2, limit=100, group="a"),
                _request(10, n=6, limit=20, group="b"), _request(10, n=6, limit=20, group="c"),
                _request(5, n=1, limit=5)]
    shares = assign_by_tokens(requests, engines=2, max_new_tokens=100)
    assert sorted(i for share in shares for i in share) == list(range(5))
    assert next(s for s in shares if 0 in s) == [0, 1]  # group "a" alone: 600 tokens
    assert next(s for s in shares if 2 in s) == [2, 3, 4]  # the rest: 180 + 180 + 10


def test_split_is_deterministic_and_ordered_within_an_engine():
    requests = [_request(3 + i % 4, n=1 + i % 3, group=str(i % 5)) for i in range(20)]
    first = assign_by_tokens(requests, engines=3, max_new_tokens=8)
    assert first == assign_by_tokens(requests, engines=3, max_new_tokens=8)
    assert all(share == sorted(share) for share in first)
    assert assign_by_tokens(requests, engines=1, max_new_tokens=8) == [list(range(20))]


def test_more_engines_than_groups_leaves_some_empty():
    assert assign_by_tokens([_request(3, group="x"), _request(3, group="x")], engines=3, max_new_tokens=4) == [[0, 1], [], []]


def test_needs_an_engine():
    with pytest.raises(ValueError):
        assign_by_tokens([_request(3)], engines=0, max_new_tokens=4)
