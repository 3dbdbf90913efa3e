"""The method at work on a few held-out problems, for the report: what one training step does to them.

For each problem the policy samples the G initial responses of a training step (``rollout.sampling``),
which are rewarded, split into steps and scored in one forward pass: FCI per step (spec §5), entropy
per token. One response (a wrong one where there is one, the longest) is then branched the way this run's method
branches (``algorithm.branching``: ATB on FCI for AttnRL, spec §6.1–§6.3), T continuations are rolled
out from each branch point (spec §6.4) and rewarded, and the question's tree gives every segment its
Monte-Carlo value and advantage (spec §9). Where entropy branching (TreeRL, spec §6.6) would have cut
the same response is recorded beside it, without rolling it out.

ADS (spec §7) is left out on purpose: the easy filter would drop an all-correct problem and the
expansion rule picks responses by FCI, and the report should show a tree for every traced problem.
``policy_session`` (the in-process engine whatever ``rollout.engine`` is: a few problems need no pool) is
shared with the analyses in ``benchmarks/``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnrl.branching import BranchSettings, ResponseView, get_branch_selector, select_entropy, select_fci
from attnrl.config.schema import RunConfig
from attnrl.data.problem import Problem
from attnrl.model.loading import load_policy
from attnrl.reward.verifier import Verifier
from attnrl.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams
from attnrl.rollout.factory import build_engine, engine_session
from attnrl.rollout.prompts import decode_response, encode_prompt
from attnrl.rollout.scoring import RolloutScorer, scoring_spec
from attnrl.steps import SeparatorVocab
from attnrl.training.rollouts import (
    BranchPoint,
    ScoredQuestion,
    ScoredResponse,
    continuation_requests,
    response_view,
    score_initial,
)
from attnrl.tree import Continuation, InitialResponse, Segment, build_question_tree
from attnrl.utils.seeding import derive_seed


@dataclass(frozen=True)
class Piece:
    """Part of a step's text from response token ``start`` on; ``branches`` lists the criteria ("fci",
    "entropy") that cut at that token."""

    start: int
    text: str
    branches: tuple[str, ...]


@dataclass(frozen=True)
class StepTrace:
    """One response step: its tokens ``[start, end)`` within the response, FCI, mean token entropy, and its
    text cut where a branch point falls inside it."""

    start: int
    end: int
    fci: float
    entropy: float
    pieces: tuple[Piece, ...]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)


@dataclass(frozen=True)
class SegmentTrace:
    """A node of the tree with its text; ``node.parent`` indexes the trace's segments."""

    node: Segment
    text: str


@dataclass(frozen=True)
class ProblemTrace:
    problem_id: str
    benchmark: str
    question: str                  # the last user message
    answers: tuple[str, ...]
    rewards: tuple[float, ...]     # the G initial responses
    response_index: int            # the one expanded
    steps: tuple[StepTrace, ...]
    branching: str                 # algorithm.branching: the criterion that was rolled out
    branch_offsets: tuple[int, ...]
    fci_offsets: tuple[int, ...]
    entropy_offsets: tuple[int, ...]
    root_value: float
    segments: tuple[SegmentTrace, ...]  # the expanded response's, parents first

    def step_of(self, offset: int) -> int:
        """The step that holds response token ``offset``."""
        return next(i for i, s in enumerate(self.steps) if s.start <= offset < s.end)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PolicySession:
    """A policy loaded for analysis: the in-process engine that samples with it, a scorer that computes
    what a training step's scoring pass does (log-probs, entropies, FCI always), and a verifier."""

    config: RunConfig
    tokenizer: Any
    engine: RolloutEngine
    scorer: RolloutScorer
    verifier: Verifier
    params: SamplingParams

    def sample_scored(self, problems: Sequence[Problem], seed: int) -> list[ScoredQuestion]:
        """``rollout.sampling.n`` responses to each problem, rewarded, segmented and scored (spec §3.2 step 6)."""
        prompt_ids = [tuple(encode_prompt(self.tokenizer, p.prompt)) for p in problems]
        completions = self.engine.generate([GenerationRequest(ids, n=self.config.rollout.sampling.n) for ids in prompt_ids],
                                           self.params, seed=seed)
        return score_initial(problems, prompt_ids, completions, trainer=self.scorer.trainer, tokenizer=self.tokenizer,
                             verifier=self.verifier, vocab=SeparatorVocab.from_tokenizer(self.tokenizer), with_fci=True)


@contextmanager
def policy_session(config: RunConfig, model_dir: Path) -> Iterator[PolicySession]:
    """The policy in ``model_dir`` with the in-process engine, whatever ``rollout.engine`` is: an analysis of a
    few hundred samples needs no pool."""
    sampling = config.rollout.sampling
    policy = load_policy(model_dir, dtype=config.model.dtype, device=config.model.device)
    in_process = config.model_copy(update={"rollout": config.rollout.model_copy(
        update={"engine": "hf", "ray": config.rollout.ray.model_copy(update={"enabled": False})})})
    engine = build_engine(in_process, model_dir=model_dir, tokenizer=policy.tokenizer,
                          max_new_tokens=sampling.max_new_tokens, model=policy.model)
    scorer = RolloutScorer(policy.model, dataclasses.replace(scoring_spec(config, policy.tokenizer), with_fci=True))
    params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens)
    with engine_session(engine), Verifier(timeout_s=config.reward.timeout_s, workers=config.reward.workers) as verifier:
        yield PolicySession(config, policy.tokenizer, engine, scorer, verifier, params)


def trace_problems(config: RunConfig, model_dir: Path, candidates: Sequence[Problem], count: int) -> list[ProblemTrace]:
    """Sample and score every candidate with the policy in ``model_dir``, then branch, roll out and build the
    tree of ``count`` of them: those whose samples disagree first (the problems a step learns from, spec §7),
    in candidate order."""
    if not candidates or count == 0:
        return []
    with policy_session(config, model_dir) as session:
        scored = session.sample_scored(candidates, derive_seed(config.seed, "trace", "initial"))
        scored = sorted(scored, key=lambda q: len(set(q.rewards)) == 1)[:count]  # stable: mixed first
        return [_trace(session, question, index) for index, question in enumerate(scored)]


def _trace(session: PolicySession, question: ScoredQuestion, index: int) -> ProblemTrace:
    """Branch one response of ``question`` as the run's method does, roll it out, build the tree."""
    config, tokenizer = session.config, session.tokenizer
    # A wrong response where there is one (its continuations show where it went wrong), the longest.
    chosen = min(range(len(question.responses)),
                 key=lambda r: (question.responses[r].reward, -question.responses[r].segmentation.num_steps, r))
    response = question.responses[chosen]
    view = response_view(question, response)
    settings = BranchSettings.from_config(config.algorithm)
    rng = random.Random(derive_seed(config.seed, "trace", index))
    offsets = tuple(get_branch_selector(config.algorithm.branching)(view, settings, rng))  # §6.3 may repeat one
    fci_offsets, entropy_offsets = tuple(select_fci(view, settings, rng)), tuple(select_entropy(view, settings, rng))
    requests = continuation_requests([question], [BranchPoint(0, chosen, offset) for offset in offsets],
                                     n=config.algorithm.continuations_per_branch,
                                     max_new_tokens=config.rollout.sampling.max_new_tokens)
    rolled = session.engine.generate(requests, session.params, seed=derive_seed(config.seed, "trace", "continuations",
                                                                                 index)) if requests else []
    continuations = [(offset, c) for offset, group in zip(offsets, rolled, strict=True) for c in group if c.token_ids]
    # The verifier sees the continuation only, as in training (spec §8).
    rewards = session.verifier.score_batch([(decode_response(tokenizer, c.token_ids), question.problem.answers)
                                    for _, c in continuations])
    attached = tuple(Continuation(offset, c.token_ids, c.logprobs, reward)
                     for (offset, c), reward in zip(continuations, rewards, strict=True))
    tree = build_question_tree(question.problem.uid, [
        InitialResponse(r.token_ids, r.logprobs, r.reward, attached if i == chosen else ())
        for i, r in enumerate(question.responses)])
    return ProblemTrace(
        problem_id=question.problem.id,
        benchmark=question.problem.source,
        question=question.problem.question,
        answers=tuple(question.problem.answers),
        rewards=tuple(question.rewards),
        response_index=chosen,
        steps=_steps(tokenizer, response, view, {"fci": fci_offsets, "entropy": entropy_offsets}),
        branching=config.algorithm.branching,
        branch_offsets=offsets,
        fci_offsets=fci_offsets,
        entropy_offsets=entropy_offsets,
        root_value=tree.root_value,
        segments=_segments(tokenizer, tree.segments, chosen, response, attached),
    )


def _steps(tokenizer, response: ScoredResponse, view: ResponseView,
           branches: dict[str, Sequence[int]]) -> tuple[StepTrace, ...]:
    assert response.fci is not None
    steps = []
    for k, (start, end) in enumerate(zip(view.step_offsets, view.step_ends, strict=True)):
        cuts = sorted({start, *(o for offsets in branches.values() for o in offsets if start < o < end)})
        pieces = tuple(
            Piece(lo, decode_response(tokenizer, response.token_ids[lo:hi]),
                  tuple(name for name, offsets in branches.items() if lo in offsets))
            for lo, hi in zip(cuts, [*cuts[1:], end])
        )
        steps.append(StepTrace(start, end, response.fci[k], sum(response.entropies[start:end]) / (end - start), pieces))
    return tuple(steps)


def _segments(tokenizer, segments: Sequence[Segment], chosen: int, response: ScoredResponse,
              attached: Sequence[Continuation]) -> tuple[SegmentTrace, ...]:
    """The chosen response's nodes, parents re-indexed among them. Its continuation nodes come in the
    order of ``attached`` (by offset, stable), which is the tree's order too."""
    mine = [i for i, segment in enumerate(segments) if segment.response_index == chosen]
    position = {i: k for k, i in enumerate(mine)}
    branches = iter(attached)
    out = []
    for i in mine:
        s = segments[i]
        tokens = next(branches).token_ids if s.continuation else response.token_ids[s.start : s.end]
        node = dataclasses.replace(s, parent=None if s.parent is None else position[s.parent])
        out.append(SegmentTrace(node, decode_response(tokenizer, tokens)))
    return tuple(out)
