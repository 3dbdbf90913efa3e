"""A synthetic task family with a planted critical step (``data.synthetic.family: planted``).

A problem defines ``level`` variables and asks for one of them combined with a digit::

    a=3+5,b=2+7,c=4+1,b+4

The reference solution defines one variable per step, then answers the query with the value it
reuses, then boxes the answer::

    a=3+5=8

    b=2+7=9

    c=4+1=5

    b+4=9+4=3

    \\boxed{3}

The definition of the queried variable (step 1 here) is the **critical step**: a wrong value there
makes the answer wrong, a wrong value in any other definition changes nothing, and the query step
reads it back (the attention a later step pays to a step is what FCI measures, spec §5). So which
step matters is known per problem, which the chain task (every step feeds the next) cannot say:
branch-point criteria can be scored against it (``benchmarks/branch_points.py``).
"""

from __future__ import annotations

import random
import re

from attnrl.errors import DataError

VARIABLES = "abcdefghij"
_DEFINITION = re.compile(r"([a-j])=(\d)([+\-*])(\d)")
_QUERY = re.compile(r"([a-j])([+\-*])(\d)")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

Definition = tuple[str, int, str, int]  # name, left, operator, right
Query = tuple[str, str, int]            # name, operator, digit


def parse_planted(expression: str) -> tuple[list[Definition], Query]:
    """``'a=3+5,b=2+7,b+4'`` into its definitions and its query; DataError naming the part that is wrong."""
    *parts, last = expression.strip().split(",")
    definitions = []
    for index, part in enumerate(parts):
        match = _DEFINITION.fullmatch(part)
        if match is None or match.group(1) != VARIABLES[index]:
            raise DataError(f"planted expression {expression!r}: definition {index + 1} {part!r} is not "
                            f"'{VARIABLES[index]}=<digit><op><digit>'")
        definitions.append((match.group(1), int(match.group(2)), match.group(3), int(match.group(4))))
    query = _QUERY.fullmatch(last)
    if not definitions or query is None or query.group(1) not in {d[0] for d in definitions}:
        raise DataError(f"planted expression {expression!r}: must end with a query '<defined variable><op><digit>'")
    return definitions, (query.group(1), query.group(2), int(query.group(3)))


def planted_expression(level: int, modulus: int, operators: str, rng: random.Random) -> str:
    if not 1 <= level <= len(VARIABLES):
        raise DataError(f"planted task: level (number of definitions) must be 1..{len(VARIABLES)}, got {level}")
    parts = [f"{VARIABLES[i]}={rng.randrange(modulus)}{rng.choice(operators)}{rng.randrange(modulus)}" for i in range(level)]
    return ",".join([*parts, f"{VARIABLES[rng.randrange(level)]}{rng.choice(operators)}{rng.randrange(modulus)}"])


def planted_space(level: int, modulus: int, operators: str) -> int:
    return (modulus**2 * len(operators)) ** level * level * len(operators) * modulus


def planted_steps(expression: str, modulus: int, *, error_rate: float = 0.0,
                  rng: random.Random | None = None) -> list[str]:
    """The reference steps; with ``error_rate`` each value (definitions and the query) is wrong with that
    probability, and the query reuses whatever value its variable got (a self-consistent trace)."""
    if error_rate and rng is None:
        raise ValueError("an error_rate needs an rng")

    def value(true: int) -> int:
        if error_rate and rng.random() < error_rate:
            return (true + rng.randrange(1, modulus)) % modulus
        return true % modulus

    definitions, (name, op, digit) = parse_planted(expression)
    values, steps = {}, []
    for variable, left, operator, right in definitions:
        values[variable] = value(_APPLY[operator](left, right))
        steps.append(f"{variable}={left}{operator}{right}={values[variable]}")
    answer = value(_APPLY[op](values[name], digit))
    steps.append(f"{name}{op}{digit}={values[name]}{op}{digit}={answer}")
    steps.append(f"\\boxed{{{answer}}}")
    return steps


def planted_answer(expression: str, modulus: int) -> str:
    return planted_steps(expression, modulus)[-1].removeprefix("\\boxed{").removesuffix("}")


def planted_critical_step(expression: str) -> int:
    """The response step (0-based) that defines the queried variable."""
    definitions, (name, _, _) = parse_planted(expression)
    return [d[0] for d in definitions].index(name)
