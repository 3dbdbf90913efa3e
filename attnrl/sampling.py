"""ADS: adaptive sampling (spec §7): easy filter, trees per problem, which responses, batch size.

Per question, with n initial responses and 0/1 rewards:

1. z = the fraction correct (spec §7.1).
2. The attention-based easy filter (spec §7.2) drops problems whose mean FCI does not beat a
   running mean of all-correct problems' mean FCI.
3. ``num_trees(z)`` responses are expanded (spec §7.3), minority outcome first (spec §7.4).

Across steps, :class:`BatchSizeController` steers the number of prompts so the post-filter training
batch tracks a target (spec §7.5).

Resolved ambiguities (spec §16):

* AMBIG-1: ``ceil`` (code) or ``round`` (paper) for the tree count and the batch update; "round"
  is round-half-up here. No tie occurs for z = k/n in the tree count, so the §7.3 table holds for
  either tie rule. The batch update is computed in exact rational arithmetic, with λ read as its
  decimal literal (0.9 = 9/10): in binary floating point 0.1·64 + 0.9·64 exceeds 64, and ceil
  would then grow a batch that is exactly on target.
* AMBIG-2: ``easy_filter`` picks the scope: ``all_correct`` (code, strict ``>``), ``all`` (paper
  Eq. 8, every problem, ``≥``), ``off``. Both filters compare against the same running mean of
  all-correct problems, the only reference the paper (Fig. 4) and code define.
* AMBIG-6: minority-outcome responses are always expanded, the rest are drawn at random from the
  majority; all-correct problems expand their first ``num_trees(1)`` responses.
* AMBIG-14(h): an empty post-filter batch (B'' = 0) is treated as half the target (the ratio B'/B''
  becomes ``empty_batch_ratio``, 2 by default): a bounded 10 % growth at λ = 0.9, not a division
  by zero.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

TREE_ROUNDINGS = ("ceil", "round")
EASY_FILTERS = ("all_correct", "all", "off")
EXPANSIONS = ("adaptive", "uniform")


def _check_choice(kind: str, value: str, known: Sequence[str]) -> None:
    if value not in known:
        raise ValueError(f"unknown {kind} {value!r}; known: {', '.join(known)}")


def _round_half_up(x: float | Fraction) -> int:
    return math.floor(x + Fraction(1, 2) if isinstance(x, Fraction) else x + 0.5)


def _apply_rounding(x: float | Fraction, rounding: str) -> int:
    _check_choice("rounding", rounding, TREE_ROUNDINGS)
    return math.ceil(x) if rounding == "ceil" else _round_half_up(x)


# --- trees per problem (§7.3) ------------------------------------------------------------------


def num_trees(z: float, n: int, rounding: str) -> int:
    """Trees to expand for difficulty z (spec §7.3): ceil (code) or Round (paper Eq. 9) of n·e^{−z}.

    The code writes e^{(1−z)−1}, which is e^{−z}. Round can give 0 for n = 1 at high z; that value
    is returned as is (nothing expanded), since neither source defines a floor.
    """
    if not 0.0 <= z <= 1.0:
        raise ValueError(f"z (fraction correct) must be in [0, 1], got {z}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _apply_rounding(n * math.exp(-z), rounding)


# --- running mean (§7.2) -----------------------------------------------------------------------


class RunningMean:
    """Cumulative count-weighted mean (the code's ``RunningAverage`` with α = 0, spec §7.2).

    Checkpointed with the run (the code's ``running_average.pt``). ``mean`` is 0.0 before any
    update; :func:`plan_expansion` treats an empty mean as "no reference yet" and keeps the problem.
    """

    def __init__(self) -> None:
        self._sum = 0.0
        self._count = 0

    def update(self, values: Iterable[float]) -> None:
        values = [float(v) for v in values]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"RunningMean.update: values must be finite, got {values}")
        self._sum += math.fsum(values)
        self._count += len(values)

    @property
    def mean(self) -> float:
        return self._sum / self._count if self._count else 0.0

    @property
    def count(self) -> int:
        return self._count

    def state_dict(self) -> dict[str, float | int]:
        return {"sum": self._sum, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        count = int(state["count"])
        if count < 0:
            raise ValueError(f"RunningMean state: count must be >= 0, got {count}")
        self._sum = float(state["sum"])
        self._count = count

    def __repr__(self) -> str:
        return f"RunningMean(mean={self.mean!r}, count={self._count})"


# --- expansion plan (§7.2, §7.4) ---------------------------------------------------------------


@dataclass(frozen=True)
class ExpansionPlan:
    """What to do with one question: drop it, or branch the responses at ``expand`` (ascending).

    ``z`` and ``mean_attn`` are recorded for metrics and logging.
    """

    question: str
    drop: bool
    expand: tuple[int, ...]
    z: float = 0.0
    mean_attn: float = 0.0


def response_mean_fci(fci: Sequence[float]) -> float:
    """A response's mean FCI over its response steps, forced zeros included (spec §7.2)."""
    return math.fsum(fci) / len(fci) if fci else 0.0


def _check_rewards(question: str, rewards: Sequence[float]) -> None:
    if not rewards:
        raise ValueError(f"{question}: no responses")
    bad = [r for r in rewards if r not in (0.0, 1.0)]
    if bad:
        raise ValueError(f"{question}: rewards must be 0 or 1 (spec §8 acc), got {bad}")


def _question_stats(
    question: str, rewards: Sequence[float], mean_fci_per_response: Sequence[float]
) -> tuple[float, float]:
    """(z, mean_attn) of spec §7.1–§7.2."""
    _check_rewards(question, rewards)
    if len(mean_fci_per_response) != len(rewards):
        raise ValueError(f"{question}: {len(mean_fci_per_response)} mean FCI values for {len(rewards)} responses")
    return sum(rewards) / len(rewards), response_mean_fci(mean_fci_per_response)


def _is_easy_drop(z: float, mean_attn: float, easy_mean: RunningMean, easy_filter: str) -> bool:
    """Spec §7.2 / AMBIG-2: whether the attention-based filter removes this question."""
    if easy_filter == "off" or easy_mean.count == 0:
        return False
    if easy_filter == "all_correct":
        return z == 1.0 and not mean_attn > easy_mean.mean
    return not mean_attn >= easy_mean.mean


def _adaptive_indices(rewards: Sequence[float], z: float, rounding: str, rng: random.Random) -> list[int]:
    """Spec §7.4: which responses get trees under difficulty-aware expansion."""
    n = len(rewards)
    m = num_trees(z, n, rounding)
    if z == 0.0:
        return list(range(n))
    if z == 1.0:
        return list(range(min(m, n)))
    correct = [i for i, r in enumerate(rewards) if r == 1.0]
    incorrect = [i for i, r in enumerate(rewards) if r == 0.0]
    # z = 0.5 counts as "mostly correct" (the code's z >= 0.5), so the incorrect half is kept whole.
    minority, majority = (incorrect, correct) if 2 * len(correct) >= n else (correct, incorrect)
    # For 0/1 rewards the minority never exceeds m (1 − z ≤ e^{−z}); were it to, all of it is kept,
    # since the spec guarantees the minority outcome is always branched.
    fill = max(0, min(m - len(minority), len(majority)))
    return minority + rng.sample(majority, fill)


def plan_expansion(
    question: str,
    rewards: Sequence[float],
    mean_fci_per_response: Sequence[float],
    *,
    easy_mean: RunningMean,
    easy_filter: str,
    expansion: str,
    rounding: str,
    rng: random.Random,
) -> ExpansionPlan:
    """Plan one question (spec §7.2 filter, §7.3–§7.4 expansion).

    ``easy_mean`` must already include this batch's all-correct questions (spec §7.2: the mean is
    updated before the comparison); :func:`plan_batch` does that. Without FCI (TreeRL, GRPO) pass
    zeros and ``easy_filter="off"``.
    """
    _check_choice("easy_filter", easy_filter, EASY_FILTERS)
    _check_choice("expansion", expansion, EXPANSIONS)
    _check_choice("rounding", rounding, TREE_ROUNDINGS)
    z, mean_attn = _question_stats(question, rewards, mean_fci_per_response)
    if _is_easy_drop(z, mean_attn, easy_mean, easy_filter):
        return ExpansionPlan(question, drop=True, expand=(), z=z, mean_attn=mean_attn)
    if expansion == "uniform":
        indices = list(range(len(rewards)))
    else:
        indices = _adaptive_indices(rewards, z, rounding, rng)
    return ExpansionPlan(question, drop=False, expand=tuple(sorted(indices)), z=z, mean_attn=mean_attn)


def plan_batch(
    questions: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    easy_mean: RunningMean,
    *,
    easy_filter: str,
    expansion: str,
    rounding: str,
    rng: random.Random,
) -> list[ExpansionPlan]:
    """Plan a batch of ``(question, rewards, mean_fci_per_response)`` in order (spec §7.2–§7.4).

    First folds the mean FCI of this batch's all-correct questions into ``easy_mean`` (so a lone
    all-correct question in the first batch equals the mean and is dropped under the strict
    ``all_correct`` test, as in the code). With ``easy_filter="off"`` the mean is left untouched:
    nothing reads it, and FCI may not have been computed at all.
    """
    _check_choice("easy_filter", easy_filter, EASY_FILTERS)
    if easy_filter != "off":
        stats = [_question_stats(q, rewards, fci) for q, rewards, fci in questions]
        easy_mean.update(mean_attn for z, mean_attn in stats if z == 1.0)
    return [
        plan_expansion(
            q,
            rewards,
            fci,
            easy_mean=easy_mean,
            easy_filter=easy_filter,
            expansion=expansion,
            rounding=rounding,
            rng=rng,
        )
        for q, rewards, fci in questions
    ]


# --- adaptive prompt batch size (§7.5) ---------------------------------------------------------


def default_target_sequences(prompt_batch_size: int, n: int, num_points: int, continuations: int) -> int:
    """B' of spec §7.5: every prompt fully expanded, 1 + N·T paths per tree (64·6·5 = 1920)."""
    return prompt_batch_size * n * (1 + num_points * continuations)


def _exact(x: float) -> Fraction:
    # The decimal literal the user wrote (0.9 -> 9/10), not its binary approximation.
    return Fraction(repr(float(x)))


@dataclass
class BatchSizeController:
    """Prompts per step, steered so the post-filter training batch tracks ``target`` (spec §7.5).

    ``next_size(B'')`` with B = the current size:

    * ``ceil`` (code): ⌈(1−λ)·⌊B·B'/B''⌋ + λ·B⌉, i.e. ⌈0.1·⌊B·1920/B''⌋ + 0.9·B⌉ at λ = 0.9;
    * ``round`` (paper Eq. 10): Round(λ·B + (1−λ)·(B'/B'')·B), half up.

    The result is clamped to [min_size, max_size] (no upper clamp when max_size is None).
    """

    initial_size: int
    target: int
    ema_lambda: float = 0.9
    rounding: str = "ceil"
    min_size: int = 1
    max_size: int | None = None
    empty_batch_ratio: float = 2.0

    def __post_init__(self) -> None:
        _check_choice("rounding", self.rounding, TREE_ROUNDINGS)
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {self.min_size}")
        if self.max_size is not None and self.max_size < self.min_size:
            raise ValueError(f"max_size {self.max_size} is below min_size {self.min_size}")
        if self.target < 1:
            raise ValueError(f"target must be >= 1, got {self.target}")
        if not 0.0 <= self.ema_lambda <= 1.0:
            raise ValueError(f"ema_lambda must be in [0, 1], got {self.ema_lambda}")
        if self.empty_batch_ratio < 1.0:
            raise ValueError(f"empty_batch_ratio must be >= 1, got {self.empty_batch_ratio}")
        self._size = self._clamp(self.initial_size)
        self._updates = 0

    @classmethod
    def from_config(cls, algorithm: Any, n: int, max_size: int | None = None) -> BatchSizeController:
        """From an ``AlgorithmConfig`` and the samples per prompt n (``rollout.sampling.n``)."""
        target = algorithm.target_train_sequences or default_target_sequences(
            algorithm.prompt_batch_size, n, algorithm.num_branch_points, algorithm.continuations_per_branch
        )
        return cls(
            initial_size=algorithm.prompt_batch_size,
            target=target,
            ema_lambda=algorithm.batch_ema_lambda,
            rounding=algorithm.batch_size_rounding,
            max_size=max_size,
        )

    @property
    def size(self) -> int:
        """The prompt batch size to sample next."""
        return self._size

    def _clamp(self, size: int) -> int:
        size = max(self.min_size, size)
        return size if self.max_size is None else min(self.max_size, size)

    def _target_term(self, valid_sequences: int) -> Fraction:
        """B·B'/B'' (floored for ``ceil``, as the code floor-divides); AMBIG-14(h) when B'' = 0."""
        b = self._size
        if valid_sequences == 0:
            scaled = b * _exact(self.empty_batch_ratio)
        else:
            scaled = Fraction(b * self.target, valid_sequences)
        return Fraction(math.floor(scaled)) if self.rounding == "ceil" else scaled

    def next_size(self, valid_sequences: int) -> int:
        """Update with last step's post-filter sequence count B'' and return the new size."""
        if valid_sequences < 0:
            raise ValueError(f"valid_sequences must be >= 0, got {valid_sequences}")
        lam = _exact(self.ema_lambda)
        blended = lam * self._size + (1 - lam) * self._target_term(valid_sequences)
        self._size = self._clamp(_apply_rounding(blended, self.rounding))
        self._updates += 1
        return self._size

    def state_dict(self) -> dict[str, int]:
        return {"size": self._size, "updates": self._updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        size = int(state["size"])
        if size < 1:
            raise ValueError(f"BatchSizeController state: size must be >= 1, got {size}")
        self._size = size
        self._updates = int(state.get("updates", 0))
