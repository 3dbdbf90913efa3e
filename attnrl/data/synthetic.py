"""The embedded default task: step-by-step modular arithmetic chains.

A problem is an expression such as ``3+5-7`` (all arithmetic modulo ``modulus``, evaluated left
to right). The reference solution takes one operation per step: it writes that operation with
its value, followed by the rest of the chain still to be evaluated, one step per paragraph,
and ends with the boxed answer::

    3+5=8-7

    8-7=1

    \\boxed{1}

(read the first step as "3+5 gives 8, leaving 8-7"). Steps are separated by blank lines
(``\\n\\n``), exactly the delimiter AttnRL segments on (spec §4). Writing the value right after
its operands keeps every computation at a fixed distance from its inputs, which a ~1 M
parameter model learns in a few hundred steps; rewriting the chain without the ``a+b=`` prefix
(stack-notes.md) left it at chance on held-out problems. The difficulty level is the number of
operations. A fixed share of the expression space (chosen by a hash, so independent of the
seed) is held out: evaluation problems never occur in training.

This chain is the ``chain`` family of ``data.synthetic.family``; ``planted`` (``attnrl/data/planted.py``)
is a family whose one critical step is known per problem. ``FAMILIES`` maps the names to what each
family generates and solves.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from attnrl.config.schema import SyntheticTaskConfig
from attnrl.data.planted import planted_answer, planted_critical_step, planted_expression, planted_space, planted_steps
from attnrl.data.problem import Problem
from attnrl.errors import DataError
from attnrl.utils.registry import lookup

STEP_SEPARATOR = "\n\n"
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def parse_expression(text: str) -> tuple[list[int], list[str]]:
    """Split ``'3+5-7'`` into numbers ``[3, 5, 7]`` and operators ``['+', '-']``."""
    numbers, operators = [], []
    expect_number = True
    for char in text.strip():
        if expect_number and char.isdigit():
            numbers.append(int(char))
        elif not expect_number and char in _APPLY:
            operators.append(char)
        else:
            raise DataError(f"synthetic expression {text!r}: unexpected character {char!r}")
        expect_number = not expect_number
    if expect_number:
        raise DataError(f"synthetic expression {text!r}: must end with a number")
    return numbers, operators


def format_expression(numbers: list[int], operators: list[str]) -> str:
    return "".join(f"{n}{op}" for n, op in zip(numbers, operators, strict=False)) + str(numbers[-1])


def solution_steps(
    expression: str, modulus: int, *, error_rate: float = 0.0, rng: random.Random | None = None
) -> list[str]:
    """The reference steps: ``a op b = value`` for the first operation, then the remaining chain.

    With ``error_rate`` > 0 each operation is, with that probability, given a wrong value (drawn
    uniformly from the other residues) and the chain goes on from it, like a fallible teacher's
    worked solution: the trace stays self-consistent but its final answer is wrong.
    """
    if error_rate and rng is None:
        raise ValueError("an error_rate needs an rng")
    numbers, operators = parse_expression(expression)
    steps = []
    while operators:
        value = _APPLY[operators[0]](numbers[0], numbers[1]) % modulus
        if error_rate and rng.random() < error_rate:
            value = (value + rng.randrange(1, modulus)) % modulus
        remaining = format_expression([value, *numbers[2:]], operators[1:])
        steps.append(f"{numbers[0]}{operators[0]}{numbers[1]}={remaining}")
        numbers, operators = [value, *numbers[2:]], operators[1:]
    steps.append(f"\\boxed{{{numbers[0]}}}")
    return steps


def final_answer(expression: str, modulus: int) -> str:
    """The value of the expression, as the reference solution boxes it."""
    numbers, operators = parse_expression(expression)
    value = numbers[0]
    for op, number in zip(operators, numbers[1:], strict=True):
        value = _APPLY[op](value, number) % modulus
    return str(value)


def chain_expression(level: int, modulus: int, operators: str, rng: random.Random) -> str:
    numbers = [rng.randrange(modulus) for _ in range(level + 1)]
    return format_expression(numbers, [rng.choice(operators) for _ in range(level)])


def chain_critical_steps(expression: str) -> tuple[int, ...]:
    """Every operation's step: each feeds the next (with ``+`` and ``-`` a wrong value always changes the answer)."""
    return tuple(range(len(parse_expression(expression)[1])))


@dataclass(frozen=True)
class TaskFamily:
    """What a synthetic family generates (``expression(level, modulus, operators, rng)``, of ``space``
    distinct ones per level) and how it is solved: ``steps(expression, modulus, error_rate=, rng=)``,
    ``answer(expression, modulus)``, and the ``critical_steps`` whose error changes the answer."""

    expression: Callable[[int, int, str, random.Random], str]
    space: Callable[[int, int, str], int]
    steps: Callable[..., list[str]]
    answer: Callable[[str, int], str]
    critical_steps: Callable[[str], tuple[int, ...]]


FAMILIES: dict[str, TaskFamily] = {
    "chain": TaskFamily(chain_expression, lambda level, m, ops: m ** (level + 1) * len(ops) ** level,
                        solution_steps, final_answer, chain_critical_steps),
    "planted": TaskFamily(planted_expression, planted_space, planted_steps, planted_answer,
                          lambda expression: (planted_critical_step(expression),)),
}


def task_family(name: str) -> TaskFamily:
    """The family registered under ``name`` (``data.synthetic.family``); an unknown name lists the known."""
    return lookup(FAMILIES, name, "synthetic task family", DataError)


def reference_solution(
    expression: str, modulus: int, *, family: str = "chain", error_rate: float = 0.0, rng: random.Random | None = None
) -> str:
    """The full reference response: steps joined by blank lines, ending in ``\\boxed{answer}``."""
    return STEP_SEPARATOR.join(task_family(family).steps(expression, modulus, error_rate=error_rate, rng=rng))


def is_held_out(expression: str, fraction: float) -> bool:
    """Whether an expression belongs to the evaluation share of the space (seed independent)."""
    digest = hashlib.blake2b(expression.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def generate_problems(config: SyntheticTaskConfig, *, split: str, seed: int, name: str = "synthetic") -> list[Problem]:
    """Distinct problems per level for ``split`` ('train' or 'test'), reproducible from ``seed``.

    Levels whose space is smaller than requested yield every expression they have.
    """
    if split not in ("train", "test"):
        raise DataError(f"synthetic split must be 'train' or 'test', got {split!r}")
    per_level = config.train_per_level if split == "train" else config.eval_per_level
    want_held_out = split == "test"
    family = task_family(config.family)
    problems = []
    for level in config.levels:
        rng = random.Random(f"{seed}/{split}/{level}")
        for index, expression in enumerate(_distinct_expressions(config, family, level, rng, want_held_out, per_level)):
            problems.append(
                Problem(
                    id=f"L{level}-{index}",
                    prompt=({"role": "user", "content": expression},),
                    answers=(family.answer(expression, config.modulus),),
                    source=f"{name}-L{level}",
                    split=split,
                    level=level,
                )
            )
    return problems


def _distinct_expressions(
    config: SyntheticTaskConfig, family: TaskFamily, level: int, rng: random.Random, held_out: bool, count: int
) -> Iterator[str]:
    space = family.space(level, config.modulus, config.operators)
    seen: set[str] = set()
    # Rejection sampling; the attempt cap ends small spaces (level 1 has only a few hundred).
    for _ in range(max(50 * count, 20 * space if space < 100_000 else 0)):
        if len(seen) == count:
            return
        expression = family.expression(level, config.modulus, config.operators, rng)
        if expression in seen or is_held_out(expression, config.holdout_fraction) != held_out:
            continue
        seen.add(expression)
        yield expression
