"""Scoring samples where they were generated (spec §3.2, step 6; docs/scaling.md, overlap).

With split placement the rollout engines score what they sample with the weights that sampled it
while the trainer group updates: the next batch's initial samples (``sequences``: behaviour
log-probs, entropies and FCI) and the current batch's continuations (``logprobs``: their behaviour
log-probs, spec §10.2), so the trainer's only passes are the reference's and the update. The scorer
is a ``PolicyTrainer`` without an optimizer over the engine's policy (the hf engine's own model),
with the trainer's settings, so it computes what the trainer would: the same passes, micro-batches
and temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from transformers import PreTrainedModel

from attnrl.rollout.engine import Completion, FinishedGeneration, GenerationRequest
from attnrl.steps import SeparatorVocab, segment_response

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from attnrl.config.schema import AlgorithmConfig, RunConfig, TrainConfig
    from attnrl.training.trainer import ScoredSequence


T = TypeVar("T")
ScoreKind = Literal["sequences", "logprobs"]
SCORE_KINDS: tuple[ScoreKind, ...] = ("sequences", "logprobs")


def check_score_kind(kind: str) -> None:
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {kind!r}; known: {', '.join(SCORE_KINDS)}")


def engine_scores(config: RunConfig) -> bool:
    """Whether the engines score what they sample during the update (split placement, spec §3.2 overlap)."""
    d = config.distributed
    return d.enabled and d.placement == "split" and d.overlap and config.algorithm.off_policy


def needs_fci(config: RunConfig) -> bool:
    """FCI costs a blocked attention pass: compute it only when branching or the easy filter reads it."""
    return config.algorithm.branching == "fci" or config.algorithm.easy_filter != "off"


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
        flat = _non_empty(requests, completions)
        segmentations = None
        if self.spec.with_fci:
            segmentations = [segment_response(c.token_ids, len(r.prompt_ids), self.spec.separators) for r, c in flat]
        return _regrouped(self.trainer.score([r.prompt_ids for r, _ in flat], [c.token_ids for _, c in flat],
                                             segmentations), completions)

    def logprobs(self, requests: Sequence[GenerationRequest],
                 completions: Sequence[Sequence[Completion]]) -> list[list[tuple[float, ...] | None]]:
        """Per request, per completion, the log-probs of its tokens after the request's prompt (None
        for an empty completion): the trainer's ``logprobs`` pass."""
        flat = _non_empty(requests, completions)
        return _regrouped(self.trainer.logprobs([r.prompt_ids for r, _ in flat], [c.token_ids for _, c in flat]),
                          completions)

    def run(self, kind: ScoreKind, requests: Sequence[GenerationRequest],
            completions: Sequence[Sequence[Completion]]) -> list[list[object]]:
        """``score`` (``sequences``) or ``logprobs``; an unknown kind lists the known ones."""
        check_score_kind(kind)
        return self.score(requests, completions) if kind == "sequences" else self.logprobs(requests, completions)


def _non_empty(requests: Sequence[GenerationRequest],
               completions: Sequence[Sequence[Completion]]) -> list[tuple[GenerationRequest, Completion]]:
    return [(r, c) for r, group in zip(requests, completions, strict=True) for c in group if c.token_ids]


def _regrouped(values: Sequence[T], completions: Sequence[Sequence[Completion]]) -> list[list[T | None]]:
    """``values`` of the non-empty completions, back in their groups (None where a completion is empty)."""
    flat = iter(values)
    return [[next(flat) if c.token_ids else None for c in group] for group in completions]


def scoring_spec(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> ScoringSpec:
    """The loop's scoring settings, for engines that score like its trainer."""
    return ScoringSpec(
        algorithm=config.algorithm, train=config.train, temperature=config.rollout.sampling.temperature,
        pad_token_id=tokenizer.pad_token_id, separators=SeparatorVocab.from_tokenizer(tokenizer),
        with_fci=needs_fci(config),
    )


class NothingScored(FinishedGeneration):
    """An empty scored submission."""

    def __init__(self) -> None:
        super().__init__([])

    def scores(self) -> list[list[ScoredSequence | None]]:
        return []
