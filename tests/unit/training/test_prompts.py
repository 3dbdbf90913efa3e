from __future__ import annotations

import pytest

from attnrl.data.problem import make_problem
from attnrl.training.prompts import PromptSampler


def _problems(n):
    return [make_problem(id=i, prompt=f"q{i}", answers=["1"], source="t", split="train", where="test") for i in range(n)]


def test_batches_roll_into_new_shuffled_epochs_and_resume_exactly():
    sampler = PromptSampler(_problems(5), seed=3)
    first = [p.id for p in sampler.take(4)]
    second = [p.id for p in sampler.take(4)]  # one from epoch 0, three from epoch 1
    assert sorted(first + second[:1]) == ["0", "1", "2", "3", "4"]
    assert sampler.state_dict() == {"epoch": 1, "position": 3}
    resumed = PromptSampler(_problems(5), seed=3)
    resumed.load_state_dict(sampler.state_dict())
    assert [p.id for p in resumed.take(6)] == [p.id for p in sampler.take(6)]


def test_an_empty_problem_set_is_an_error():
    with pytest.raises(ValueError, match="no training problems"):
        PromptSampler([], seed=0)
