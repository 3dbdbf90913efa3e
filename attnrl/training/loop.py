"""The RL loops of spec §3: one-step off-policy (one generation call per step) and two-step on-policy.

One training step, off-policy (spec §3.2, §3.3)::

    E        <- sample prompts (adaptive size, §7.5)
    plan     <- ADS + branch points for C (initial samples from the previous policy)
    out      <- ONE generation round with the current policy: n initial samples for D and
                T continuations per branch point of C, sent as two submissions
    D        <- reward, segment, score (log-probs, entropy, FCI) with the current policy
    trees(C) <- values and advantages (§9), zero-advantage filter (§7.6)
    update on C's paths (behaviour log-probs per token, §10.2), push weights to the engine
    C, D     <- D, E

Overlap: on an engine that generates in the background (the Ray actor pool), C's continuations
are still being generated while the trainer scores D; they are collected only when the update
needs them. Same weights, same seeds, same samples: only the wall time changes. Each submission
has its own seed (round, part), so an engine with or without background generation returns the
same completions.

On-policy (TreeRL-style, §3.1) samples a batch, scores it, and makes a second call for its
continuations, all with the same weights. Every random choice is seeded from (seed, call
index), and the whole state (weights, optimizer, sampler cursor, ADS running mean, batch-size
controller, pending batches) is checkpointed, so N steps equal N/2 steps + resume + N/2 steps.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from attnrl.config.schema import RunConfig
from attnrl.data.problem import Problem
from attnrl.reward.verifier import Verifier
from attnrl.rollout.engine import (
    Completion,
    FinishedGeneration,
    GenerationRequest,
    PendingGeneration,
    RolloutEngine,
    SamplingParams,
    submit_generation,
)
from attnrl.rollout.prompts import decode_response, encode_prompt
from attnrl.sampling import BatchSizeController, ExpansionPlan, RunningMean
from attnrl.steps import SeparatorVocab
from attnrl.training.metrics import step_metrics
from attnrl.training.prompts import PromptSampler
from attnrl.training.rollouts import (
    BranchPoint,
    ScoredQuestion,
    build_trees,
    continuation_requests,
    plan_branches,
    score_initial,
    trainable_trees,
    training_sequences,
)
from attnrl.training.trainer import PolicyTrainer, TrainSequence
from attnrl.tree import TrainingPath
from attnrl.utils.seeding import derive_seed

logger = logging.getLogger(__name__)

T = TypeVar("T")
PhaseRunner = Callable[[str, Callable[[], T]], T]
BatchCheck = Callable[[int, Sequence[TrainingPath]], None]  # (step, the paths it will train on)


def run_directly(name: str, fn: Callable[[], T]) -> T:
    """The default phase runner: just call it (an orchestrator passes one that records each phase)."""
    return fn()


@dataclass
class LoopState:
    """Everything besides weights and optimizer that a resumed run needs."""

    step: int = 0                   # training steps done (updates applied)
    generation_calls: int = 0
    generated_tokens: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)
    easy_mean: dict[str, Any] = field(default_factory=dict)
    controller: dict[str, Any] = field(default_factory=dict)
    pending_scored: list[ScoredQuestion] | None = None  # C: initial samples awaiting their tree
    pending_prompts: list[Problem] | None = None        # D: sampled, not generated yet
    metrics: list[dict[str, float]] = field(default_factory=list)


class RLLoop:
    """Runs training steps over a ``RolloutEngine`` and a ``PolicyTrainer``."""

    def __init__(
        self,
        config: RunConfig,
        *,
        problems: list[Problem],
        engine: RolloutEngine,
        trainer: PolicyTrainer,
        tokenizer: PreTrainedTokenizerBase,
        verifier: Verifier,
        phases: PhaseRunner = run_directly,
        check_batch: BatchCheck | None = None,
    ) -> None:
        """``phases`` runs every training step (named ``step-N``) and each phase inside it
        (``generate``, ``score``, ``update``, …), so a workflow engine can show and time them."""
        self.config = config
        self.phases = phases
        self.check_batch = check_batch
        self.algorithm = config.algorithm
        self.engine = engine
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.verifier = verifier
        self.vocab = SeparatorVocab.from_tokenizer(tokenizer)
        self.sampler = PromptSampler(problems, derive_seed(config.seed, "prompts"))
        self.easy_mean = RunningMean()
        self.controller = BatchSizeController.from_config(config.algorithm, n=config.rollout.sampling.n)
        self.state = LoopState()
        self._prompt_ids: dict[str, tuple[int, ...]] = {}
        sampling = config.rollout.sampling
        self.params = SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens
        )
        # FCI costs a blocked attention pass; only compute it when something reads it.
        self.with_fci = self.algorithm.branching == "fci" or self.algorithm.easy_filter != "off"

    # -- state

    def state_dict(self) -> LoopState:
        self.state.sampler = self.sampler.state_dict()
        self.state.easy_mean = self.easy_mean.state_dict()
        self.state.controller = self.controller.state_dict()
        return self.state

    def load_state_dict(self, state: LoopState) -> None:
        self.state = state
        self.sampler.load_state_dict(state.sampler)
        self.easy_mean.load_state_dict(state.easy_mean)
        self.controller.load_state_dict(state.controller)

    # -- the loop

    def run(self, steps: int, on_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Train until ``steps`` training steps are done in total (or the token budget is spent)."""
        budget = self.config.train.max_generated_tokens
        while self.state.step < steps and (budget is None or self.state.generated_tokens < budget):
            started = time.perf_counter()
            step = self._off_policy_step if self.algorithm.off_policy else self._on_policy_step
            name = f"step-{self.state.step + 1}" if self._updates_this_call() else "bootstrap"
            stats = self.phases(name, step)
            if stats is None:  # a bootstrapping call of the off-policy pipeline: no update yet
                continue
            stats["step_time_s"] = time.perf_counter() - started
            self.state.metrics.append(stats)
            if on_step is not None:
                on_step(stats)
        return self.state.metrics

    def _updates_this_call(self) -> bool:
        """False for the off-policy pipeline's first call, which only generates (spec §3.2)."""
        return not self.algorithm.off_policy or self.state.pending_scored is not None

    def _batch_size(self) -> int:
        return self.controller.size if self.algorithm.adaptive_batch else self.algorithm.prompt_batch_size

    def _prompts(self, problems: list[Problem]) -> list[tuple[int, ...]]:
        out = []
        for problem in problems:
            if problem.uid not in self._prompt_ids:
                self._prompt_ids[problem.uid] = tuple(encode_prompt(self.tokenizer, problem.prompt))
            out.append(self._prompt_ids[problem.uid])
        return out

    def _submit(self, *parts: list[GenerationRequest]) -> list[PendingGeneration]:
        """One generation round (one ``generation_calls`` tick), each part submitted with its own seed."""
        call = self.state.generation_calls
        self.state.generation_calls += 1
        return [
            submit_generation(self.engine, requests, self.params, derive_seed(self.config.seed, "generate", call, i))
            if requests else FinishedGeneration([])
            for i, requests in enumerate(parts)
        ]

    def _collect(self, pending: PendingGeneration) -> list[list[Completion]]:
        out = pending.result()
        self.state.generated_tokens += sum(len(c.token_ids) for group in out for c in group)
        return out

    def _generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        return self._collect(self._submit(requests)[0])

    def _initial_requests(self, problems: list[Problem]) -> list[GenerationRequest]:
        n = self.config.rollout.sampling.n
        return [GenerationRequest(ids, n=n, group=p.uid) for p, ids in zip(problems, self._prompts(problems), strict=True)]

    def _score(self, problems: list[Problem], completions: list[list[Completion]]) -> list[ScoredQuestion]:
        return score_initial(
            problems,
            self._prompts(problems),
            completions,
            trainer=self.trainer,
            tokenizer=self.tokenizer,
            verifier=self.verifier,
            vocab=self.vocab,
            with_fci=self.with_fci,
        )

    def _plan(self, batch: list[ScoredQuestion]) -> tuple[list[ExpansionPlan], list[BranchPoint]]:
        rng = random.Random(derive_seed(self.config.seed, "plan", self.state.generation_calls))
        if self.algorithm.advantage == "grpo":  # outcome-only: every question kept, nothing branched
            return [ExpansionPlan(str(q), False, ()) for q in range(len(batch))], []
        return plan_branches(batch, self.algorithm, self.easy_mean, rng)

    def _continuation_requests(
        self, batch: list[ScoredQuestion], points: list[BranchPoint]
    ) -> list[GenerationRequest]:
        return continuation_requests(
            batch, points, n=self.algorithm.continuations_per_branch, max_new_tokens=self.params.max_new_tokens
        )

    def _off_policy_step(self) -> dict[str, float] | None:
        state = self.state
        if state.pending_prompts is None:  # the very first call only samples (spec §3.2 bootstrapping)
            state.pending_prompts = self.sampler.take(self._batch_size())
        current, upcoming = state.pending_scored, state.pending_prompts
        next_prompts = self.sampler.take(self._batch_size())
        plans, points = self._plan(current) if current else ([], [])
        tokens_before = state.generated_tokens
        # Continuations first: they are needed last, so they generate while D is scored.
        mc, initial = self.phases("generate", lambda: self._submit(
            self._continuation_requests(current or [], points), self._initial_requests(upcoming)))
        scored_next = self.phases("score", lambda: self._score(upcoming, self._collect(initial)))
        stats = None
        if current:
            stats = self.phases("update", lambda: self._train(current, plans, points, self._collect(mc)))
            stats["generated_tokens"] = float(state.generated_tokens - tokens_before)
            stats["prompt_batch_size"] = float(len(current))
        state.pending_scored, state.pending_prompts = scored_next, next_prompts
        return stats

    def _on_policy_step(self) -> dict[str, float]:
        state = self.state
        tokens_before = state.generated_tokens
        problems = self.sampler.take(self._batch_size())
        completions = self.phases("generate", lambda: self._generate(self._initial_requests(problems)))
        scored = self.phases("score", lambda: self._score(problems, completions))
        plans, points = self._plan(scored)
        continuations = self.phases(
            "generate-continuations", lambda: self._generate(self._continuation_requests(scored, points)))
        stats = self.phases("update", lambda: self._train(scored, plans, points, continuations))
        stats["generated_tokens"] = float(state.generated_tokens - tokens_before)
        stats["prompt_batch_size"] = float(len(problems))
        return stats

    def _train(
        self,
        batch: list[ScoredQuestion],
        plans: list[ExpansionPlan],
        points: list[BranchPoint],
        continuations: list[list[Completion]],
    ) -> dict[str, float]:
        # An empty continuation (out-of-vocabulary first id, spec §5.4) adds no leaf to its tree.
        continuations = [[c for c in group if c.token_ids] for group in continuations]
        flat = [(p, c) for p, group in zip(points, continuations, strict=True) for c in group]
        prefixes = [batch[p.question].prompt_ids + batch[p.question].responses[p.response].token_ids[: p.offset] for p, _ in flat]
        texts = [decode_response(self.tokenizer, c.token_ids) for _, c in flat]
        # The verifier sees the continuation only (spec §8: MC samples decode continuation tokens).
        mc_rewards = self.verifier.score_batch(
            [(text, batch[p.question].problem.answers) for (p, _), text in zip(flat, texts, strict=True)]
        )
        # Behaviour log-probs of continuation tokens: a fresh forward with the current policy,
        # which sampled them; prefix tokens keep their stored values (spec §10.2).
        mc_logprobs = self.trainer.logprobs(prefixes, [c.token_ids for _, c in flat]) if flat else []
        built = build_trees(batch, plans, points, continuations, mc_logprobs, mc_rewards, self.algorithm)
        trees, dropped_zero = trainable_trees(built, self.algorithm)
        if self.check_batch is not None:  # before anything is trained on it
            self.check_batch(self.state.step + 1, [path for tree in trees for path in tree.paths])
        sequences = training_sequences(trees, {sq.problem.uid: sq.prompt_ids for sq in batch})
        if self.algorithm.kl_coef > 0 and sequences:
            refs = self.trainer.logprobs([s.prompt_ids for s in sequences], [s.response_ids for s in sequences], reference=True)
            sequences = [TrainSequence(s.prompt_ids, s.response_ids, s.old_logprobs, s.advantages, r) for s, r in zip(sequences, refs, strict=True)]
        update = self.trainer.update(sequences)
        if sequences:
            self.engine.update_weights(self.trainer.policy_state())
        self.state.step += 1
        if self.algorithm.adaptive_batch:
            self.controller.next_size(len(sequences))
        return step_metrics(
            step=self.state.step,
            batch=batch,
            plans=plans,
            points=points,
            mc_rewards=mc_rewards,
            built=built,
            trees=trees,
            dropped_zero=dropped_zero,
            sequences=sequences,
            update=update,
            continuations_per_point=self.algorithm.continuations_per_branch,
            total_generated=self.state.generated_tokens,
        )
