"""The planted-critical-step family: the critical step is where the generator says, an error there changes
the answer, an error in any other definition does not."""

from __future__ import annotations

import random

import pytest

from attnrl.config.schema import SyntheticTaskConfig
from attnrl.data.planted import parse_planted, planted_answer, planted_critical_step, planted_expression, planted_steps
from attnrl.data.synthetic import generate_problems, reference_solution, task_family
from attnrl.errors import DataError


class ErrorAt(random.Random):
    """An rng that makes exactly the ``index``-th value (0-based, in step order) wrong, by +1."""

    def __init__(self, index: int) -> None:
        super().__init__(0)
        self.index, self.calls = index, 0

    def random(self) -> float:
        self.calls += 1
        return 0.0 if self.calls - 1 == self.index else 1.0

    def randrange(self, *args) -> int:
        return 1


def test_the_reference_solution_defines_then_reuses():
    assert reference_solution("a=3+5,b=2+7,c=4+1,b+4", 10, family="planted") == (
        "a=3+5=8\n\nb=2+7=9\n\nc=4+1=5\n\nb+4=9+4=3\n\n\\boxed{3}")
    assert planted_answer("a=3+5,b=2+7,c=4+1,b+4", 10) == "3"
    assert planted_critical_step("a=3+5,b=2+7,c=4+1,b+4") == 1


@pytest.mark.parametrize("seed", range(30))
def test_only_the_critical_step_and_the_query_decide_the_answer(seed):
    rng = random.Random(seed)
    level = rng.randint(1, 5)
    expression = planted_expression(level, 10, "+-", rng)
    critical = planted_critical_step(expression)
    steps = planted_steps(expression, 10)
    name = parse_planted(expression)[1][0]
    assert steps[critical].startswith(f"{name}=") and steps[level].startswith(name)  # the query reads it back
    truth = planted_answer(expression, 10)
    for index in range(level + 1):  # every definition, then the query
        wrong = planted_steps(expression, 10, error_rate=0.5, rng=ErrorAt(index))
        changed = wrong[-1] != f"\\boxed{{{truth}}}"
        assert changed == (index in (critical, level)), (expression, index, wrong)
    assert task_family("planted").critical_steps(expression) == (critical,)


def test_an_injected_error_always_changes_the_value():
    for seed in range(40):
        rng = random.Random(seed)
        expression = planted_expression(4, 10, "+-", rng)
        right = planted_steps(expression, 10)
        wrong = planted_steps(expression, 10, error_rate=1.0, rng=rng)
        for step, (good, bad) in enumerate(zip(right[:4], wrong[:4], strict=True)):  # the definitions
            assert good.rsplit("=", 1)[1] != bad.rsplit("=", 1)[1], (expression, step, bad)


def test_generated_problems_carry_the_family_answers_and_levels():
    config = SyntheticTaskConfig(family="planted", levels=[2, 4], train_per_level=30, eval_per_level=5)
    problems = generate_problems(config, split="test", seed=3)
    assert {p.level for p in problems} == {2, 4} and len(problems) == 10
    for problem in problems:
        definitions, _ = parse_planted(problem.question)
        assert len(definitions) == problem.level
        assert problem.answers == (planted_answer(problem.question, 10),)


def test_malformed_problems_name_the_part():
    with pytest.raises(DataError, match="definition 2 'c=1\\+2'"):
        parse_planted("a=1+2,c=1+2,a+1")
    with pytest.raises(DataError, match="must end with a query"):
        parse_planted("a=1+2,b+1")
    with pytest.raises(DataError, match="unknown synthetic task family 'tree'; known: chain, planted"):
        task_family("tree")


def test_the_chain_family_is_unchanged_and_every_step_critical():
    assert reference_solution("3+5-7", 10) == "3+5=8-7\n\n8-7=1\n\n\\boxed{1}"
    assert task_family("chain").critical_steps("3+5-7") == (0, 1)
