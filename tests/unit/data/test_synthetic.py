from __future__ import annotations

import pytest

from attnrl.config.schema import SyntheticTaskConfig
from attnrl.data.synthetic import (
    STEP_SEPARATOR,
    final_answer,
    generate_problems,
    is_held_out,
    parse_expression,
    reference_solution,
    solution_steps,
)
from attnrl.errors import DataError


def test_reference_solution_rewrites_one_operation_per_step():
    assert reference_solution("3+5-7", 10) == "3+5=8-7\n\n8-7=1\n\n\\boxed{1}"
    assert solution_steps("9*9", 10) == ["9*9=1", "\\boxed{1}"]
    assert reference_solution("4", 10) == "\\boxed{4}"


@pytest.mark.parametrize(("expression", "answer"), [("3+5-7", "1"), ("0-1", "9"), ("9+9+9", "7"), ("2*3-8", "8")])
def test_final_answer_is_left_to_right_modular(expression, answer):
    assert final_answer(expression, 10) == answer
    assert reference_solution(expression, 10).endswith(f"\\boxed{{{answer}}}")


def test_malformed_expressions_are_errors():
    for bad in ("3++5", "3+", "a+1", ""):
        with pytest.raises(DataError):
            parse_expression(bad)


def test_generated_problems_have_steps_levels_and_answers():
    config = SyntheticTaskConfig(levels=[1, 3], train_per_level=50, eval_per_level=10)
    problems = generate_problems(config, split="train", seed=7)
    assert {p.level for p in problems} == {1, 3}
    for problem in problems:
        numbers, operators = parse_expression(problem.question)
        assert len(operators) == problem.level
        solution = reference_solution(problem.question, config.modulus)
        assert solution.count(STEP_SEPARATOR) == problem.level
        assert problem.answers == (final_answer(problem.question, config.modulus),)
        assert problem.source == f"synthetic-L{problem.level}" and problem.split == "train"


def test_generation_is_reproducible_and_seed_dependent():
    config = SyntheticTaskConfig(levels=[3], train_per_level=30)
    first = generate_problems(config, split="train", seed=1)
    assert first == generate_problems(config, split="train", seed=1)
    assert first != generate_problems(config, split="train", seed=2)


def test_evaluation_expressions_never_occur_in_training():
    config = SyntheticTaskConfig(levels=[1, 2, 3], train_per_level=300, eval_per_level=50)
    train = {p.question for p in generate_problems(config, split="train", seed=1)}
    test = {p.question for p in generate_problems(config, split="test", seed=1)}
    assert test and train and not train & test
    assert all(is_held_out(q, config.holdout_fraction) for q in test)


def test_small_levels_yield_every_expression_they_have():
    # Level 1 with '+' mod 3 has 9 expressions; asking for more returns each once.
    config = SyntheticTaskConfig(levels=[1], modulus=3, operators="+", train_per_level=100, holdout_fraction=0.3)
    questions = [p.question for p in generate_problems(config, split="train", seed=1)]
    assert len(questions) == len(set(questions))
    assert 0 < len(questions) < 9


def test_unknown_split_is_an_error():
    with pytest.raises(DataError, match="split"):
        generate_problems(SyntheticTaskConfig(), split="dev", seed=1)


def test_a_fallible_teacher_writes_self_consistent_wrong_chains():
    import random

    rng = random.Random(0)
    solutions = [reference_solution("1+2+3+4", 10, error_rate=0.5, rng=rng) for _ in range(200)]
    wrong = [s for s in solutions if not s.endswith("\\boxed{0}")]
    assert 0 < len(wrong) < 200
    for solution in solutions:
        steps = solution.split(STEP_SEPARATOR)
        # Each step continues from the value the previous step wrote, right or wrong.
        for before, after in zip(steps, steps[1:-1]):
            assert after.startswith(before.split("=")[1][:1])
        assert steps[-1] == f"\\boxed{{{steps[-2].split('=')[1]}}}"
    with pytest.raises(ValueError, match="rng"):
        reference_solution("1+2", 10, error_rate=0.1)
