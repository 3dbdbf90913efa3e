"""Per-step training metrics (spec §15.4), with the official code's definitions and names in brackets.

Three populations of questions, as the official ``compute_valid_metrics`` takes them:

* the prompt batch's initial samples: ``solve_all_ratio`` / ``solve_none_ratio`` / ``valid_ratio``
  (all correct / all wrong / mixed) [batch/solve_all_ratio, ...];
* the questions that got Monte-Carlo continuations (after the easy filter), by their continuations'
  rewards alone: ``*_ratio_mc`` [batch/solve_all_ratio_mc, batch/valid_ratio_mc; Fig. 6];
* the questions trained on (after the zero-advantage filter), by their paths' leaf rewards:
  ``*_ratio_all`` [batch/valid_ratio_all; Fig. 6]. With the filter on, ``valid_ratio_all`` is 1 by
  construction (spec §7.6), as in the official runs.

Each ratio is 0.0 when its population is empty (the official code divides by zero there).

* ``filtered_ratio_all``: questions of the prompt batch not trained on, for any reason (easy filter,
  zero advantage, no branched path), over the batch [batch/filtered_ratio_all; Fig. 7(c)];
  ``easy_filtered_ratio``: those the attention-based easy filter dropped, over the batch;
* Fig. 7(a), for the questions whose initial samples were all correct ("invalid once"):
  ``correct_once_twice_invalid_ratio``: the share whose continuations were all correct too;
  ``correct_once_twice_valid_ratio``: the rest, the easy-filtered ones included (official: its
  complement); ``correct_once_filtered_ratio``: the share the easy filter dropped. The same with
  ``incorrect_`` for all-wrong initial samples. 0.0 without such questions;
* ``valid_token_ratio``: tokens of trained paths with any non-zero advantage over all trained tokens,
  after the zero-advantage filter [batch/valid_train_token_ratio; Fig. 7(b)]; ``valid_tokens`` counts
  them (Table 3 "# Valid Tokens"); ``valid_response_ratio``: the same over paths
  [batch/valid_train_response_ratio]; ``valid_token_ratio_built``: the token ratio before the
  filter, over every path built (what the filter removes);
* ``prompt_batch_size`` [batch/real_train_bs; Fig. 7(d)], generated tokens and step time are set by
  the loop.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from statistics import fmean

from attnrl.sampling import ExpansionPlan
from attnrl.training.rollouts import BranchPoint, ScoredQuestion
from attnrl.training.trainer import TrainSequence
from attnrl.tree import QuestionTree, TrainingPath


def _mean(values: Sequence[float]) -> float:
    return fmean(values) if values else 0.0


def outcome_ratios(groups: Sequence[Sequence[float]], suffix: str) -> dict[str, float]:
    """``solve_all_ratio{suffix}``, ``solve_none_ratio{suffix}``, ``valid_ratio{suffix}`` over questions
    given by their 0/1 rewards (official ``compute_valid_metrics``); 0.0 for no question."""
    all_right = [float(all(r == 1.0 for r in g)) for g in groups]
    all_wrong = [float(all(r == 0.0 for r in g)) for g in groups]
    return {
        f"solve_all_ratio{suffix}": _mean(all_right),
        f"solve_none_ratio{suffix}": _mean(all_wrong),
        f"valid_ratio{suffix}": _mean([1.0 - a - b for a, b in zip(all_right, all_wrong, strict=True)]),
    }


def once_twice_ratios(batch: Sequence[ScoredQuestion], plans: Sequence[ExpansionPlan],
                      mc_groups: dict[str, list[float]]) -> dict[str, float]:
    """Fig. 7(a): of the questions whose initial samples were all correct (all wrong), the shares whose
    continuations were all correct (all wrong) as well, the rest, and those the easy filter dropped."""
    metrics = {}
    for name, outcome in (("correct", 1.0), ("incorrect", 0.0)):
        once = [(sq, plan) for sq, plan in zip(batch, plans, strict=True) if all(r == outcome for r in sq.rewards)]
        twice = sum(1 for sq, _ in once if mc_groups.get(sq.problem.uid) and all(r == outcome for r in mc_groups[sq.problem.uid]))
        filtered = sum(1 for _, plan in once if plan.drop)
        total = max(1, len(once))  # no such question: every count is 0, so every share 0.0
        metrics |= {
            f"{name}_once_twice_invalid_ratio": twice / total,
            f"{name}_once_twice_valid_ratio": (len(once) - twice) / total,
            f"{name}_once_filtered_ratio": filtered / total,
        }
    return metrics


def _valid_tokens(paths: Sequence[TrainingPath]) -> tuple[int, int]:
    """(tokens of paths with any non-zero advantage, all tokens): spec §7.6's whole-sequence count."""
    return (sum(len(p.token_ids) for p in paths if p.has_nonzero_advantage()), sum(len(p.token_ids) for p in paths))


def step_metrics(
    *,
    step: int,
    batch: Sequence[ScoredQuestion],
    plans: Sequence[ExpansionPlan],
    points: Sequence[BranchPoint],
    built: Sequence[QuestionTree],
    trees: Sequence[QuestionTree],
    dropped_zero: int,
    sequences: Sequence[TrainSequence],
    update: dict[str, float],
) -> dict[str, float]:
    """``batch``, ``plans``: the prompt batch and its ADS plans; ``built``: the trees of the questions the easy
    filter kept; ``trees``: those the zero-advantage filter kept (trained on)."""
    rewards = [r.reward for sq in batch for r in sq.responses]
    # A question's Monte-Carlo outcomes: its continuation leaves (empty continuations added none).
    mc_groups = {tree.question: [s.reward for s in tree.segments if s.continuation] for tree in built}
    mc_groups = {question: group for question, group in mc_groups.items() if group}
    trained_paths = [path for tree in trees for path in tree.paths]
    valid_tokens, trained_tokens = _valid_tokens(trained_paths)
    built_valid, built_tokens = _valid_tokens([path for tree in built for path in tree.paths])
    questions = max(1, len(batch))
    metrics = {
        "step": float(step),
        "reward": _mean(rewards),
        "accuracy": _mean(rewards),
        **outcome_ratios([sq.rewards for sq in batch], ""),
        **outcome_ratios(list(mc_groups.values()), "_mc"),
        **outcome_ratios([[path.reward for path in tree.paths] for tree in trees], "_all"),
        **once_twice_ratios(batch, plans, mc_groups),
        "entropy": _mean([e for sq in batch for r in sq.responses for e in r.entropies]),
        "response_length": _mean([float(len(r.token_ids)) for sq in batch for r in sq.responses]),
        "mc_reward": _mean([r for group in mc_groups.values() for r in group]),
        "easy_filtered_ratio": sum(p.drop for p in plans) / questions,
        "filtered_ratio_all": (len(batch) - len(trees)) / questions,
        "zero_advantage_dropped": float(dropped_zero),
        "branch_points": float(len(points)),
        "train_sequences": float(len(sequences)),
        "train_tokens": float(sum(len(s.response_ids) for s in sequences)),
        "valid_token_ratio": valid_tokens / trained_tokens if trained_tokens else 0.0,
        "valid_tokens": float(valid_tokens),
        "valid_response_ratio": _mean([float(p.has_nonzero_advantage()) for p in trained_paths]),
        "valid_token_ratio_built": built_valid / built_tokens if built_tokens else 0.0,
    }
    metrics.update({f"update/{k}": v for k, v in update.items()})
    return metrics


def merged_update_stats(updates: Sequence[dict[str, float]]) -> dict[str, float]:
    """One step's ``Trainer.update`` stats from the updates it ran in turn (a streamed step runs one per
    mini-batch): each value is a mean per optimizer step, so the merge weighs them by their steps."""
    steps = sum(u.get("optimizer_steps", 0.0) for u in updates)
    if not steps:
        return {}
    totals: dict[str, float] = defaultdict(float)
    for u in updates:
        for key, value in u.items():
            if key != "optimizer_steps":
                totals[key] += value * u["optimizer_steps"]
    return {key: value / steps for key, value in totals.items()} | {"optimizer_steps": steps}
