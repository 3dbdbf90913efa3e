"""From generations to training sequences: scoring initial samples, choosing branch points,
building trees (spec §3.3, §6, §7, §9, §10).

The loop calls these in the order its mode dictates; they hold no state of their own.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from attnrl.advantages import get_advantage_estimator
from attnrl.branching import BranchSettings, ResponseView, get_branch_selector
from attnrl.config.schema import AlgorithmConfig
from attnrl.data.problem import Problem
from attnrl.reward.verifier import Verifier
from attnrl.rollout.engine import Completion, GenerationRequest
from attnrl.rollout.prompts import decode_response
from attnrl.sampling import ExpansionPlan, RunningMean, plan_batch, response_mean_fci
from attnrl.steps import SeparatorVocab, StepSegmentation, segment_response
from attnrl.tree import Continuation, InitialResponse, QuestionTree, filter_zero_advantage_questions
from attnrl.training.trainer import ScoredSequence, Trainer, TrainSequence


@dataclass(frozen=True)
class ScoredResponse:
    """An initial sample with everything branching and training need later (spec §3.2 step 6)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # behaviour log-probs of the policy that sampled it
    entropies: tuple[float, ...]
    segmentation: StepSegmentation
    fci: tuple[float, ...] | None  # per response step (the prompt step dropped)
    reward: float
    finish_reason: str


@dataclass(frozen=True)
class ScoredQuestion:
    problem: Problem
    prompt_ids: tuple[int, ...]
    responses: tuple[ScoredResponse, ...]

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.responses]


@dataclass(frozen=True)
class BranchPoint:
    question: int  # index into the scored batch
    response: int
    offset: int


def score_initial(
    problems: Sequence[Problem],
    prompt_ids: Sequence[tuple[int, ...]],
    completions: Sequence[Sequence[Completion]],
    *,
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    verifier: Verifier,
    vocab: SeparatorVocab,
    with_fci: bool,
    engine_scores: Sequence[Sequence[ScoredSequence | None]] | None = None,
) -> list[ScoredQuestion]:
    """Reward, segment and score (log-probs, entropies, FCI in one forward) the initial samples.

    ``engine_scores`` are scores the engines already computed with the weights that sampled the
    completions (``attnrl.rollout.scoring``); without them the trainer scores here.

    A sample the engine returned empty (its first id was out of the vocabulary, spec §5.4) has no
    step to score, branch or train: it is left out, and so is a question left with no sample.
    """
    flat = [(q, c) for q, group in enumerate(completions) for c in group if c.token_ids]
    texts = [decode_response(tokenizer, c.token_ids) for _, c in flat]
    rewards = verifier.score_batch([(text, problems[q].answers) for (q, _), text in zip(flat, texts, strict=True)])
    segmentations = [segment_response(c.token_ids, len(prompt_ids[q]), vocab) for q, c in flat]
    if engine_scores is not None:
        scored = [s for group in engine_scores for s in group if s is not None]
    else:
        scored = trainer.score(
            [prompt_ids[q] for q, _ in flat], [c.token_ids for _, c in flat], segmentations if with_fci else None
        )
    grouped: list[list[ScoredResponse]] = [[] for _ in problems]
    for (q, completion), reward, segmentation, score in zip(flat, rewards, segmentations, scored, strict=True):
        grouped[q].append(
            ScoredResponse(
                token_ids=completion.token_ids,
                logprobs=score.logprobs,
                entropies=score.entropies,
                segmentation=segmentation,
                fci=None if score.fci is None else score.fci[1:],
                reward=reward,
                finish_reason=completion.finish_reason,
            )
        )
    return [ScoredQuestion(p, tuple(ids), tuple(g)) for p, ids, g in zip(problems, prompt_ids, grouped, strict=True) if g]


def plan_branches(
    batch: Sequence[ScoredQuestion], algorithm: AlgorithmConfig, easy_mean: RunningMean, rng: random.Random
) -> tuple[list[ExpansionPlan], list[BranchPoint]]:
    """ADS (spec §7.2–7.4) then a branch criterion (spec §6) for every expanded response."""
    questions = [
        (str(q), sq.rewards, [response_mean_fci(r.fci) if r.fci is not None else 0.0 for r in sq.responses])
        for q, sq in enumerate(batch)
    ]
    plans = plan_batch(
        questions,
        easy_mean,
        easy_filter=algorithm.easy_filter,
        expansion=algorithm.expansion,
        rounding=algorithm.tree_count_rounding,
        rng=rng,
    )
    selector = get_branch_selector(algorithm.branching)
    settings = BranchSettings.from_config(algorithm)
    points: list[BranchPoint] = []
    for q, (sq, plan) in enumerate(zip(batch, plans, strict=True)):
        if plan.drop:
            continue
        for r in plan.expand:
            points.extend(BranchPoint(q, r, offset) for offset in selector(response_view(sq, sq.responses[r]), settings, rng))
    return plans, points


def response_view(question: ScoredQuestion, response: ScoredResponse) -> ResponseView:
    """What a branch selector sees of a scored response (spec §6)."""
    return ResponseView(
        prompt_len=len(question.prompt_ids),
        response_len=len(response.token_ids),
        step_offsets=tuple(response.segmentation.response_step_offsets),
        step_ends=tuple(response.segmentation.response_step_ends),
        fci=response.fci,
        entropies=response.entropies,
    )


@dataclass(frozen=True)
class QuestionPart:
    """A run of whole questions of a batch (``questions``) and their branch points (``points``)."""

    questions: slice
    points: slice

    def branch_points(self, points: Sequence[BranchPoint]) -> list[BranchPoint]:
        """This run's branch points, their question indices counted from its first question."""
        first = self.questions.start
        return [BranchPoint(p.question - first, p.response, p.offset) for p in points[self.points]]


@dataclass(frozen=True)
class TreePart:
    """A run of questions ready for the update: its trees (all, and those the filter kept) and the sequences
    to train on, reference log-probs attached."""

    built: list[QuestionTree]
    trees: list[QuestionTree]
    dropped_zero: int
    sequences: list[TrainSequence]


def question_parts(points: Sequence[BranchPoint], num_questions: int, parts: int) -> list[QuestionPart]:
    """Cut the batch into at most ``parts`` runs of whole questions with about equal numbers of branch points.

    Trees, advantages and the zero-advantage filter are per question (spec §7.6, §9), so a run can be
    trained on (rewards, log-probs, trees) as soon as its continuations are back. ``points`` must be in
    question order, as ``plan_branches`` returns them. A run ends at the first question that reaches
    its share of the points; no run is without points unless the batch has none.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if any(a.question > b.question for a, b in zip(points, points[1:])):
        raise ValueError("branch points must be in question order")
    per_question = [0] * num_questions
    for point in points:
        per_question[point.question] += 1
    out: list[QuestionPart] = []
    start = first_point = seen = 0
    for q, count in enumerate(per_question):
        seen += count
        if len(out) < parts - 1 and seen > first_point and seen * parts >= (len(out) + 1) * len(points):
            out.append(QuestionPart(slice(start, q + 1), slice(first_point, seen)))
            start, first_point = q + 1, seen
    if first_point < len(points) or not out:
        out.append(QuestionPart(slice(start, num_questions), slice(first_point, len(points))))
    elif start < num_questions:  # questions without branch points after the last cut join the last run
        out[-1] = QuestionPart(slice(out[-1].questions.start, num_questions), out[-1].points)
    return out


def continuation_requests(
    batch: Sequence[ScoredQuestion], points: Sequence[BranchPoint], *, n: int, max_new_tokens: int
) -> list[GenerationRequest]:
    """prompt ⧺ response[:offset], T samples each; prefix + continuation stays within the limit (spec §5.4).

    A question's requests form one group, so an engine pool keeps them on one engine (prefix cache)."""
    requests = []
    for point in points:
        sq = batch[point.question]
        prefix = sq.responses[point.response].token_ids[: point.offset]
        requests.append(
            GenerationRequest(sq.prompt_ids + prefix, n=n, max_new_tokens=max(1, max_new_tokens - point.offset),
                              group=sq.problem.uid)
        )
    return requests


def build_trees(
    batch: Sequence[ScoredQuestion],
    plans: Sequence[ExpansionPlan],
    points: Sequence[BranchPoint],
    continuations: Sequence[Sequence[Completion]],
    continuation_logprobs: Sequence[tuple[float, ...]],
    continuation_rewards: Sequence[float],
    algorithm: AlgorithmConfig,
) -> list[QuestionTree]:
    """Trees (values, advantages, paths) for the questions the easy filter kept (spec §9, §10)."""
    estimator = get_advantage_estimator(algorithm.advantage)
    attached: dict[tuple[int, int], list[Continuation]] = {}
    flat = [(point, c) for point, group in zip(points, continuations, strict=True) for c in group]
    for (point, completion), logprobs, reward in zip(flat, continuation_logprobs, continuation_rewards, strict=True):
        attached.setdefault((point.question, point.response), []).append(
            Continuation(point.offset, completion.token_ids, logprobs, reward)
        )
    trees = []
    for q, (sq, plan) in enumerate(zip(batch, plans, strict=True)):
        if plan.drop:
            continue
        responses = [
            InitialResponse(r.token_ids, r.logprobs, r.reward, tuple(attached.get((q, i), ())))
            for i, r in enumerate(sq.responses)
        ]
        trees.append(estimator(sq.problem.uid, responses))
    return trees


def trainable_trees(trees: Sequence[QuestionTree], algorithm: AlgorithmConfig) -> tuple[list[QuestionTree], int]:
    """The zero-advantage question filter when configured (spec §7.6): kept trees and the count dropped."""
    if not algorithm.zero_advantage_filter:
        return list(trees), 0
    return filter_zero_advantage_questions(trees)


def training_sequences(
    trees: Sequence[QuestionTree], prompt_of: dict[str, tuple[int, ...]]
) -> list[TrainSequence]:
    return [
        TrainSequence(prompt_of[tree.question], path.token_ids, path.logprobs, path.advantages)
        for tree in trees
        for path in tree.paths
    ]
