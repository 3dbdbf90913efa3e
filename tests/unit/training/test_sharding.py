"""Splitting a training batch over data-parallel ranks (spec §11): zero-advantage padding to the world
size, token-balanced shards, and mini-batches whose per-rank normalisers average to the single process's."""

from __future__ import annotations

import pytest
import torch

from attnrl.loss import LossSettings, Normaliser, k3_kl_per_token, policy_objective
from attnrl.training.sharding import pad_to_world, shard_mini_batches, shard_sequences
from attnrl.training.trainer import TrainSequence, mini_batches


def _seq(prompt: int, response: int, advantage: float = 1.0) -> TrainSequence:
    return TrainSequence(tuple(range(1, prompt + 1)), tuple(range(1, response + 1)), (-1.0,) * response,
                         (advantage,) * response, (-1.1,) * response)


def test_pad_to_world_appends_zero_advantage_copies_of_the_last_sequence():
    batch = [_seq(2, 3), _seq(1, 4, advantage=-0.5), _seq(3, 2, advantage=0.7)]
    assert pad_to_world(batch, 1) == batch and pad_to_world(batch, 3) == batch
    padded = pad_to_world(batch, 4)
    assert padded[:3] == batch and len(padded) == 4
    last, copy = batch[-1], padded[-1]
    assert copy.advantages == (0.0, 0.0)
    assert (copy.prompt_ids, copy.response_ids, copy.old_logprobs, copy.ref_logprobs) == (
        last.prompt_ids, last.response_ids, last.old_logprobs, last.ref_logprobs)
    assert len(pad_to_world(batch, 8)) == 8 and pad_to_world([], 4) == []


def test_a_padding_copy_adds_nothing_but_its_kl_and_its_token_count():
    # Spec §11: the duplicate still contributes to the KL term and to the token count, nothing else.
    torch.manual_seed(0)
    rows, width = 3, 5
    logprobs, old, ref = (-torch.rand(rows + 1, width) * 2 for _ in range(3))
    advantages = torch.randn(rows + 1, width)
    logprobs[rows], old[rows], ref[rows] = logprobs[rows - 1], old[rows - 1], ref[rows - 1]  # the copy
    advantages[rows] = 0.0
    mask = torch.ones(rows + 1, width)
    config = LossSettings(kl_coef=0.05)

    def summed(n: int) -> tuple[float, float]:
        """(pg, kl) as sums over tokens: the aggregate times the token count."""
        normaliser = Normaliser.of([width] * n)
        _, stats = policy_objective(logprobs[:n], old[:n], ref[:n], advantages[:n], mask[:n], None, config, normaliser)
        return stats["pg_loss"] * normaliser.tokens, stats["kl"] * normaliser.tokens

    (pg, kl), (pg_padded, kl_padded) = summed(rows), summed(rows + 1)
    assert pg_padded == pytest.approx(pg, abs=1e-6)
    assert kl_padded - kl == pytest.approx(float(k3_kl_per_token(logprobs[rows], ref[rows]).sum()), rel=1e-5)


def test_rank_mini_batches_are_the_single_process_ones_with_per_rank_normalisers():
    batch = pad_to_world([_seq(1 + i % 3, 1 + (5 * i) % 7) for i in range(9)], 2)
    single = mini_batches(batch, 4)
    per_rank = shard_mini_batches(batch, 4, 2)
    assert [len(ranks) for ranks in per_rank] == [len(single)] * 2
    for j, whole in enumerate(single):
        shares = [per_rank[r][j] for r in range(2)]
        assert sorted(sum((s.sequences for s in shares), ()), key=batch.index) == list(whole.sequences)
        for share in shares:
            # DeepSpeed averages the ranks' gradients: each divides by half the whole mini-batch's counts.
            assert share.normaliser == Normaliser(whole.normaliser.tokens / 2, whole.normaliser.sequences / 2)


def test_tree_packed_shards_keep_each_prompts_sequences_on_one_rank():
    prompts = [(1, 2)] * 4 + [(3,)] * 3 + [(4, 5, 6)] * 2
    responses = [(7, 8, 9, 10), (7, 8, 9, 11), (7, 8, 12), (13,), (7,) * 9, (7,) * 8 + (8,), (9,), (1,), (2,)]
    shards = shard_sequences(prompts, responses, 2, trees=True)
    assert sorted(i for shard in shards for i in shard) == list(range(9))
    for shard in shards:
        assert shard == sorted(shard)
    rank_of = {i: r for r, shard in enumerate(shards) for i in shard}
    for prompt in set(prompts):
        assert len({rank_of[i] for i in range(9) if prompts[i] == prompt}) == 1
    # Weighed by distinct tokens: (3,) has 1 + 9 + 1 + 1 = 12, (1, 2) 2 + 4 + 1 + 1 + 1 = 9, (4, 5, 6) 3 + 2 = 5.
    assert shards == [[4, 5, 6], [0, 1, 2, 3, 7, 8]]
    # Untreed, sequences of one prompt go to both ranks.
    assert len({r for r, shard in enumerate(shard_sequences(prompts, responses, 2, trees=False)) if 4 in shard or 5 in shard}) == 2
