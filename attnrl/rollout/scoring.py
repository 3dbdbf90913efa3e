"""Scoring initial samples where they were generated (spec §3.2, step 6; docs/scaling.md, overlap).

With split placement the rollout engines score the next batch's initial samples (behaviour
log-probs, entropies and FCI) with the weights that sampled them while the trainer group updates
on the current batch. The scorer is a ``PolicyTrainer`` without an optimizer over the engine's
policy (the hf engine's own model), with the trainer's settings, so it computes what the trainer
would: the same passes, micro-batches and temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers import PreTrainedModel

from attnrl.rollout.engine import Completion, GenerationRequest
from attnrl.steps import SeparatorVocab, segment_response

if TYPE_CHECKING:
    from attnrl.config.schema import AlgorithmConfig, TrainConfig
    from attnrl.training.trainer import ScoredSequence


@dataclass(frozen=True)
class ScoringSpec:
    """What an engine needs to score like the trainer (the loop's settings)."""

    algorithm: AlgorithmConfig
    train: TrainConfig
    temperature: float
    pad_token_id: int
    separators: SeparatorVocab
    with_fci: bool


class RolloutScorer:
    """Scores an engine's completions with the engine's current weights."""

    def __init__(self, model: PreTrainedModel, spec: ScoringSpec) -> None:
        from attnrl.training.trainer import PolicyTrainer

        self.spec = spec
        self.trainer = PolicyTrainer(model, None, reference=None, pad_token_id=spec.pad_token_id,
                                     algorithm=spec.algorithm, train=spec.train, temperature=spec.temperature)

    def score(self, requests: Sequence[GenerationRequest],
              completions: Sequence[Sequence[Completion]]) -> list[list[ScoredSequence | None]]:
        """Per request, per completion, its scores (None for an empty completion: nothing to score)."""
        flat = [(r, c) for r, group in zip(requests, completions, strict=True) for c in group if c.token_ids]
        segmentations = None
        if self.spec.with_fci:
            segmentations = [segment_response(c.token_ids, len(r.prompt_ids), self.spec.separators) for r, c in flat]
        scored = iter(self.trainer.score([r.prompt_ids for r, _ in flat], [c.token_ids for _, c in flat], segmentations))
        return [[next(scored) if c.token_ids else None for c in group] for group in completions]
