"""Splitting a training batch over data-parallel ranks (spec §11).

* ``pad_to_world``: the batch is padded to a multiple of the world size with copies of its last
  sequence whose advantages are zero (verl's ``crop_or_pad_training_batch``). A copy adds nothing
  to the policy-gradient term and still counts in the KL term and in the token count.
* ``shard_mini_batches``: the padded batch is cut into the same consecutive mini-batches a single
  process would use, and each mini-batch is split over the ranks balanced by tokens, so the
  ranks' averaged gradient is the single process's, step for step.
* ``shard_sequences``: the sequences of a pass (scoring or a mini-batch) balanced by tokens over the ranks
  (``attnrl/utils/partition.py``), order kept within each shard; tree-packed
  (``train.tree_packing``), the sequences of one prompt stay on one rank, weighed by their distinct
  tokens, so a question's shared prefixes run once, on that rank.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnrl.training.sequences import tree_tokens
from attnrl.training.trainer import MiniBatch, TrainSequence, mini_batches
from attnrl.utils.partition import balanced_partition


def pad_to_world(sequences: Sequence[TrainSequence], world_size: int) -> list[TrainSequence]:
    """``sequences`` plus zero-advantage copies of the last one up to a multiple of ``world_size``."""
    missing = -len(sequences) % world_size
    if not sequences or not missing:
        return list(sequences)
    last = sequences[-1]
    copy = TrainSequence(last.prompt_ids, last.response_ids, last.old_logprobs, (0.0,) * len(last.advantages),
                         last.ref_logprobs)
    return [*sequences, *([copy] * missing)]


def shard_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], world_size: int, *,
                    trees: bool) -> list[list[int]]:
    """Indices per rank (``balanced_partition`` by tokens); with ``trees``, whole groups of one prompt, each weighed
    by the distinct tokens of its prefix tree, then each shard in the original order."""
    if not trees:
        return balanced_partition([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)], world_size)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(i)
    members = list(groups.values())
    weights = [tree_tokens([prompts[i] for i in group], [responses[i] for i in group]) for group in members]
    return [sorted(i for g in shard for i in members[g]) for shard in balanced_partition(weights, world_size)]


def shard_mini_batches(sequences: Sequence[TrainSequence], size: int, world_size: int, *,
                       trees: bool = False) -> list[list[MiniBatch]]:
    """Per rank, its share of every mini-batch of ``size`` sequences (``shard_sequences``), with the whole
    mini-batch's normaliser divided by the world size (``Normaliser.per_rank``)."""
    per_rank: list[list[MiniBatch]] = [[] for _ in range(world_size)]
    for batch in mini_batches(sequences, size):
        prompts, responses = [s.prompt_ids for s in batch.sequences], [s.response_ids for s in batch.sequences]
        normaliser = batch.normaliser.per_rank(world_size)
        for rank, indices in enumerate(shard_sequences(prompts, responses, world_size, trees=trees)):
            per_rank[rank].append(MiniBatch(tuple(batch.sequences[i] for i in indices), normaliser))
    return per_rank
