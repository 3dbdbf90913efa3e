"""Advantage estimators: the tree process advantage (spec §9) and the GRPO outcome advantage (spec §13.1).

Every estimator in ``ADVANTAGE_ESTIMATORS`` has one signature, ``(question, responses) -> QuestionTree``,
so the trainer can swap methods by name:

* ``"tree"``: AttnRL / TreeRL segment trees with MC values (spec §9, §10.1), i.e. ``build_question_tree``;
* ``"grpo"``: one path per initial response with the group-normalised outcome advantage broadcast to
  every token (spec §13.1). GRPO never branches, so continuations are an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from attnrl.tree import InitialResponse, QuestionTree, TrainingPath, build_question_tree
from attnrl.utils.registry import lookup

GRPO_EPS = 1e-6


class AdvantageEstimator(Protocol):
    def __call__(self, question: str, responses: Sequence[InitialResponse]) -> QuestionTree: ...


def grpo_advantages(rewards: Sequence[float], eps: float = GRPO_EPS) -> list[float]:
    """Â_i = (R_i − mean) / (std + eps) over one prompt's group, unbiased std (spec §13.1, verl).

    A group of size 1 uses mean 0 and std 1, as verl does, so its single advantage is R / (1 + eps)
    rather than 0. An empty group gives an empty list.
    """
    n = len(rewards)
    if n == 0:
        return []
    if n == 1:
        mean, std = 0.0, 1.0
    else:
        mean = math.fsum(rewards) / n
        std = math.sqrt(math.fsum((r - mean) ** 2 for r in rewards) / (n - 1))  # unbiased, like torch.std
    return [(r - mean) / (std + eps) for r in rewards]


def score_from_acc(acc: float) -> float:
    """The verifier's ±1 score from the 0/1 accuracy (spec §8: score +1 if correct, −1 if not).

    GRPO normalises the score, trees use the accuracy; the two differ only through eps (spec §13.1).
    """
    return 1.0 if acc == 1.0 else -1.0


def grpo_question_tree(question: str, responses: Sequence[InitialResponse]) -> QuestionTree:
    """GRPO as a (flat) question tree: every response is a training path (spec §13.1).

    Advantages are computed on the ±1 verifier scores, as verl does; ``reward`` and ``root_value`` stay on
    the 0/1 accuracy so the zero-advantage filter and metrics read the same as for trees. Unlike the tree
    estimator, length-1 paths are trained: they are the whole GRPO batch.
    """
    if not responses:
        raise ValueError(f"question {question!r}: no responses")
    for index, response in enumerate(responses):
        where = f"question {question!r}, response {index}"
        if response.continuations:
            raise ValueError(f"{where}: GRPO does not branch, but the response has continuations")
        if response.reward not in (0.0, 1.0):
            raise ValueError(f"{where}: reward must be 0 or 1, got {response.reward!r}")
        if len(response.token_ids) != len(response.logprobs):
            raise ValueError(f"{where}: {len(response.token_ids)} token ids but {len(response.logprobs)} log-probs")

    advantages = grpo_advantages([score_from_acc(r.reward) for r in responses])
    paths = tuple(
        TrainingPath(
            question=question,
            response_index=index,
            token_ids=tuple(response.token_ids),
            logprobs=tuple(response.logprobs),
            advantages=(advantage,) * len(response.token_ids),
            reward=float(response.reward),
            original_tokens=len(response.token_ids),
            ends_in_continuation=False,
        )
        for index, (response, advantage) in enumerate(zip(responses, advantages, strict=True))
    )
    rewards = tuple(float(r.reward) for r in responses)
    return QuestionTree(question=question, root_value=sum(rewards) / len(rewards), paths=paths, leaf_rewards=rewards)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "tree": build_question_tree,
    "grpo": grpo_question_tree,
}


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered under ``name``; ValueError listing the known names otherwise."""
    return lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")
