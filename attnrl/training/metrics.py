"""Per-step training metrics (spec §15.4; code names in brackets where the paper plots them).

* reward / accuracy of the initial samples, their entropy and response length;
* solve_all_ratio_mc / solve_none_ratio_mc: among questions that got continuations, the share
  whose continuations were all correct / all wrong [batch/solve_*_ratio_mc, Fig. 6];
* valid_prompt_ratio: questions left after the easy and zero-advantage filters over the batch
  [batch/valid_ratio_all];
* valid_token_ratio: tokens of paths with any non-zero advantage over all tokens of the paths
  built (before the zero-advantage filter, which would make it 1 by construction, spec §7.6)
  [batch/valid_train_token_ratio, Fig. 7(b)]; valid_tokens counts them (Table 3 "# Valid Tokens");
* filtered_ratio: questions dropped by the attention-based easy filter [Fig. 7(c)];
* prompt_batch_size [batch/real_train_bs, Fig. 7(d)], generated tokens, step time (set by the loop).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from statistics import fmean

from attnrl.sampling import ExpansionPlan
from attnrl.training.rollouts import BranchPoint, ScoredQuestion
from attnrl.training.trainer import TrainSequence
from attnrl.tree import QuestionTree


def _mean(values: Sequence[float]) -> float:
    return fmean(values) if values else 0.0


def step_metrics(
    *,
    step: int,
    batch: Sequence[ScoredQuestion],
    plans: Sequence[ExpansionPlan],
    points: Sequence[BranchPoint],
    mc_rewards: Sequence[float],
    built: Sequence[QuestionTree],
    trees: Sequence[QuestionTree],
    dropped_zero: int,
    sequences: Sequence[TrainSequence],
    update: dict[str, float],
    continuations_per_point: int,
) -> dict[str, float]:
    rewards = [r.reward for sq in batch for r in sq.responses]
    per_question: dict[int, list[float]] = defaultdict(list)
    for i, point in enumerate(points):
        per_question[point.question].extend(mc_rewards[i * continuations_per_point : (i + 1) * continuations_per_point])
    mc_groups = [g for g in per_question.values() if g]
    tokens = [len(s.response_ids) for s in sequences]
    built_paths = [path for tree in built for path in tree.paths]
    built_tokens = sum(len(path.token_ids) for path in built_paths)
    valid_tokens = sum(len(path.token_ids) for path in built_paths if any(a != 0 for a in path.advantages))
    questions = max(1, len(batch))
    metrics = {
        "step": float(step),
        "reward": _mean(rewards),
        "accuracy": _mean(rewards),
        "solve_all_ratio_initial": _mean([float(all(r == 1.0 for r in sq.rewards)) for sq in batch]),
        "solve_none_ratio_initial": _mean([float(all(r == 0.0 for r in sq.rewards)) for sq in batch]),
        "entropy": _mean([e for sq in batch for r in sq.responses for e in r.entropies]),
        "response_length": _mean([float(len(r.token_ids)) for sq in batch for r in sq.responses]),
        "mc_reward": _mean(list(mc_rewards)),
        "solve_all_ratio_mc": _mean([float(all(r == 1.0 for r in g)) for g in mc_groups]),
        "solve_none_ratio_mc": _mean([float(all(r == 0.0 for r in g)) for g in mc_groups]),
        "filtered_ratio": sum(p.drop for p in plans) / questions,
        "valid_prompt_ratio": len(trees) / questions,
        "zero_advantage_dropped": float(dropped_zero),
        "branch_points": float(len(points)),
        "train_sequences": float(len(sequences)),
        "train_tokens": float(sum(tokens)),
        "valid_token_ratio": valid_tokens / built_tokens if built_tokens else 0.0,
        "valid_tokens": float(valid_tokens),
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
