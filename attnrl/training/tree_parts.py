"""One run of questions' trees, ready to train on: spec §8 (continuation rewards), §9 (values and
advantages), §7.6 (the zero-advantage filter), §10.2 (behaviour log-probs) and §11 (the KL reference).

The loop hands each run of questions here as soon as its continuations are back, so the trees of one
part are built while the engines generate the next (attnrl/training/loop.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from attnrl.config.schema import AlgorithmConfig
from attnrl.reward.verifier import Verifier
from attnrl.rollout.engine import Completion
from attnrl.rollout.prompts import decode_response
from attnrl.sampling import ExpansionPlan
from attnrl.training.rollouts import (
    BranchPoint,
    ScoredQuestion,
    TreePart,
    build_trees,
    trainable_trees,
    training_sequences,
)
from attnrl.training.trainer import Trainer, TrainSequence


@dataclass(frozen=True)
class TreePartBuilder:
    """Builds a ``TreePart`` from a run of questions, their plans and branch points, and the continuations."""

    trainer: Trainer
    tokenizer: PreTrainedTokenizerBase
    verifier: Verifier
    algorithm: AlgorithmConfig

    def build(self, questions: Sequence[ScoredQuestion], plans: Sequence[ExpansionPlan],
              points: Sequence[BranchPoint], continuations: list[list[Completion]],
              engine_logprobs: list[list[tuple[float, ...] | None]] | None = None) -> TreePart:
        """``points`` index into ``questions`` (a part's local view); ``continuations`` has a group per point;
        ``engine_logprobs``: the behaviour log-probs the engines sent with the continuations, if they did."""
        # An empty continuation (out-of-vocabulary first id, spec §5.4) adds no leaf to its tree.
        continuations = [[c for c in group if c.token_ids] for group in continuations]
        flat = [(p, c) for p, group in zip(points, continuations, strict=True) for c in group]
        tokens = [c.token_ids for _, c in flat]
        texts = [decode_response(self.tokenizer, t) for t in tokens]
        # The verifier sees the continuation only (spec §8: MC samples decode continuation tokens).
        mc_rewards = self.verifier.score_batch(
            [(text, questions[p.question].problem.answers) for (p, _), text in zip(flat, texts, strict=True)]
        )
        # Behaviour log-probs of continuation tokens: a fresh forward with the current policy, which
        # sampled them (the engine's own, when it scored them); prefix tokens keep their stored values
        # (spec §10.2).
        if engine_logprobs is not None:
            mc_logprobs = [values for group in engine_logprobs for values in group if values is not None]
        elif flat:
            prefixes = [questions[p.question].prompt_ids + questions[p.question].responses[p.response].token_ids[: p.offset]
                        for p, _ in flat]
            mc_logprobs = self.trainer.logprobs(prefixes, tokens)
        else:
            mc_logprobs = []
        built = build_trees(questions, plans, points, continuations, mc_logprobs, mc_rewards, self.algorithm)
        trees, dropped_zero = trainable_trees(built, self.algorithm)
        sequences = training_sequences(trees, {sq.problem.uid: sq.prompt_ids for sq in questions})
        refs = self.reference_logprobs(sequences)
        if refs is not None:
            sequences = [TrainSequence(s.prompt_ids, s.response_ids, s.old_logprobs, s.advantages, r)
                         for s, r in zip(sequences, refs, strict=True)]
        return TreePart(built, trees, dropped_zero, sequences)

    def reference_logprobs(self, sequences: list[TrainSequence]) -> list[tuple[float, ...]] | None:
        """The frozen reference's log-probs of the paths (spec §11 KL term); None when the KL is off."""
        if self.algorithm.kl_coef <= 0 or not sequences:
            return None
        return self.trainer.logprobs([s.prompt_ids for s in sequences], [s.response_ids for s in sequences],
                                     reference=True)
