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
needs them. With ``engine_scores`` (split placement, ``distributed.overlap``) the engines, which
hold θ_k, do more of the step: they compute the behaviour log-probs of C's continuations while
the trainer runs the reference pass, then generate and score D while the trainer updates on C;
the new weights are pushed once D is scored (spec §3.2's policy versions either way). Same weights, same seeds, same samples: only the wall time changes. Each
submission has its own seed (round, part), so an engine with or without background generation
returns the same completions.

On-policy (TreeRL-style, §3.1) samples a batch, scores it, and makes a second call for its
continuations, all with the same weights. Every random choice is seeded from (seed, call
index), and the whole state (weights, optimizer, sampler cursor, ADS running mean, batch-size
controller, pending batches) is checkpointed, so N steps equal N/2 steps + resume + N/2 steps.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
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
from attnrl.rollout.scoring import ScoringSpec
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
from attnrl.training.trainer import ScoredSequence, Trainer, TrainSequence
from attnrl.tree import QuestionTree, TrainingPath
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
    """Runs training steps over a ``RolloutEngine`` and a ``Trainer`` (in this process or a rank group)."""

    def __init__(
        self,
        config: RunConfig,
        *,
        problems: list[Problem],
        engine: RolloutEngine,
        trainer: Trainer,
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
        self._weights_changed = False
        self._prompt_ids: dict[str, tuple[int, ...]] = {}
        sampling = config.rollout.sampling
        self.params = SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens
        )
        self.with_fci = needs_fci(config)
        self.engine_scores = engine_scores(config)
        # Colocated placement: the engines share each GPU with a trainer rank and sleep (free their
        # memory) whenever the trainer works; engines without a sleep mode stay as they are.
        self.colocated = config.distributed.enabled and config.distributed.placement == "colocated"
        if self.engine_scores and not callable(getattr(engine, "submit_scored", None)):
            raise ValueError("distributed.overlap: this engine cannot score what it generates (needs a Ray pool "
                             "built with the loop's scoring_spec)")

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
            if (replaced := getattr(self.engine, "replaced_actors", None)) is not None:
                stats["engines_replaced"] = float(replaced)  # over the run so far: a pool replaces dead engines
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

    def _submit(self, *parts: list[GenerationRequest], scored: int | None = None) -> list[PendingGeneration]:
        """One generation round (one ``generation_calls`` tick), each part submitted with its own seed;
        part ``scored`` is also scored by the engines (``submit_scored``)."""
        call = self._next_round()
        return [self._submit_part(call, i, requests, scored=i == scored) for i, requests in enumerate(parts)]

    def _next_round(self) -> int:
        call = self.state.generation_calls
        self.state.generation_calls += 1
        return call

    def _submit_part(self, call: int, part: int, requests: list[GenerationRequest], *,
                     scored: bool = False) -> PendingGeneration:
        """Part ``part`` of round ``call``: its seed depends on both only, whenever it is submitted."""
        seed = derive_seed(self.config.seed, "generate", call, part)
        if scored:
            return self.engine.submit_scored(requests, self.params, seed) if requests else NothingScored()
        return submit_generation(self.engine, requests, self.params, seed) if requests else FinishedGeneration([])

    def _collect(self, pending: PendingGeneration) -> list[list[Completion]]:
        out = pending.result()
        self.state.generated_tokens += sum(len(c.token_ids) for group in out for c in group)
        return out

    def _generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        return self._collect(self._submit(requests)[0])

    def _initial_requests(self, problems: list[Problem]) -> list[GenerationRequest]:
        n = self.config.rollout.sampling.n
        return [GenerationRequest(ids, n=n, group=p.uid) for p, ids in zip(problems, self._prompts(problems), strict=True)]

    def _score(self, problems: list[Problem], completions: list[list[Completion]],
               scores: list[list[ScoredSequence | None]] | None = None) -> list[ScoredQuestion]:
        return score_initial(
            problems,
            self._prompts(problems),
            completions,
            trainer=self.trainer,
            tokenizer=self.tokenizer,
            verifier=self.verifier,
            vocab=self.vocab,
            with_fci=self.with_fci,
            engine_scores=scores,
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
        continuations, initial_requests = self._continuation_requests(current or [], points), self._initial_requests(upcoming)
        stats = None
        if self.engine_scores:
            # The engines generate C's continuations, then compute their behaviour log-probs while the
            # trainer runs the reference pass, then generate and score D with θ_k while the trainer updates
            # on C; the new weights go out once D is scored (the engines must score it with θ_k).
            call = self._next_round()
            mc = self._submit_part(call, 0, continuations)
            submitted: list[PendingGeneration] = []

            def behaviour(prefixes: list[tuple[int, ...]], tokens: list[tuple[int, ...]]) -> Callable[[], list]:
                pending = self.engine.submit_logprobs(prefixes, tokens) if tokens else FinishedGeneration([])
                submitted.append(self._submit_part(call, 1, initial_requests, scored=True))
                return pending.result

            if current:
                stats = self.phases("update", lambda: self._train(current, plans, points, self._collect(mc),
                                                                  push=False, behaviour=behaviour))
            else:
                behaviour([], [])
            initial = submitted[0]
            scored_next = self.phases("score", lambda: self._score(upcoming, self._collect(initial), initial.scores()))
            if current:
                self.phases("sync-weights", self._push_weights)
        elif self.colocated:
            # The engines finish the round, then sleep while the trainer scores D and updates on C.
            mc, initial = self.phases("generate", lambda: self._generated(
                self._submit(continuations, initial_requests)))
            with self._engines_asleep():
                scored_next = self.phases("score", lambda: self._score(upcoming, self._collect(initial)))
                if current:
                    stats = self.phases("update", lambda: self._train(current, plans, points, self._collect(mc),
                                                                      push=False))
            self._push_weights()
        else:
            # Continuations first: they are needed last, so they generate while D is scored.
            mc, initial = self.phases("generate", lambda: self._submit(continuations, initial_requests))
            scored_next = self.phases("score", lambda: self._score(upcoming, self._collect(initial)))
            if current:
                stats = self.phases("update", lambda: self._train(current, plans, points, self._collect(mc)))
        if stats is not None:
            stats["generated_tokens"] = float(state.generated_tokens - tokens_before)
            stats["prompt_batch_size"] = float(len(current))
        state.pending_scored, state.pending_prompts = scored_next, next_prompts
        return stats

    def _on_policy_step(self) -> dict[str, float]:
        state = self.state
        tokens_before = state.generated_tokens
        problems = self.sampler.take(self._batch_size())
        completions = self.phases("generate", lambda: self._generate(self._initial_requests(problems)))
        with self._engines_asleep():
            scored = self.phases("score", lambda: self._score(problems, completions))
        plans, points = self._plan(scored)
        continuations = self.phases(
            "generate-continuations", lambda: self._generate(self._continuation_requests(scored, points)))
        with self._engines_asleep():
            stats = self.phases("update", lambda: self._train(scored, plans, points, continuations, push=False))
        self._push_weights()
        stats["generated_tokens"] = float(state.generated_tokens - tokens_before)
        stats["prompt_batch_size"] = float(len(problems))
        return stats

    @contextlib.contextmanager
    def _engines_asleep(self) -> Iterator[None]:
        """Colocated placement: the engines free their GPU memory for the trainer's passes (vLLM's sleep
        mode; a no-op for engines without one) and wake before the next push or generation."""
        if not self.colocated:
            yield
            return
        self.engine.sleep()
        try:
            yield
        finally:
            self.engine.wake()

    @staticmethod
    def _generated(pending: list[PendingGeneration]) -> list[PendingGeneration]:
        """Wait until every part of a round is back (``result()`` keeps it for the collector)."""
        for part in pending:
            part.result()
        return pending

    def _reference_logprobs(self, sequences: list[TrainSequence]) -> list[tuple[float, ...]] | None:
        """The frozen reference's log-probs of the paths (spec §11 KL term); None when the KL is off."""
        if self.algorithm.kl_coef <= 0 or not sequences:
            return None
        return self.trainer.logprobs([s.prompt_ids for s in sequences], [s.response_ids for s in sequences],
                                     reference=True)

    def _push_weights(self) -> None:
        if self._weights_changed:
            self.trainer.push_weights(self.engine)
            self._weights_changed = False

    def _train(
        self,
        batch: list[ScoredQuestion],
        plans: list[ExpansionPlan],
        points: list[BranchPoint],
        continuations: list[list[Completion]],
        *,
        push: bool = True,
        behaviour: Callable[[list[tuple[int, ...]], list[tuple[int, ...]]], Callable[[], list]] | None = None,
    ) -> dict[str, float]:
        """Trees, the update, and (``push``) the new weights to the engines.

        ``behaviour(prefixes, continuations)`` starts the continuations' behaviour log-prob pass on the
        engines, which hold the policy that sampled them, and returns how to collect it; the trainer runs
        the reference pass meanwhile, which needs only the paths' tokens (split placement, overlap).
        Without it the trainer computes both, one after the other."""
        # An empty continuation (out-of-vocabulary first id, spec §5.4) adds no leaf to its tree.
        continuations = [[c for c in group if c.token_ids] for group in continuations]
        flat = [(p, c) for p, group in zip(points, continuations, strict=True) for c in group]
        prefixes = [batch[p.question].prompt_ids + batch[p.question].responses[p.response].token_ids[: p.offset] for p, _ in flat]
        tokens = [c.token_ids for _, c in flat]
        texts = [decode_response(self.tokenizer, t) for t in tokens]
        # The verifier sees the continuation only (spec §8: MC samples decode continuation tokens).
        mc_rewards = self.verifier.score_batch(
            [(text, batch[p.question].problem.answers) for (p, _), text in zip(flat, texts, strict=True)]
        )
        prompt_of = {sq.problem.uid: sq.prompt_ids for sq in batch}

        def paths(mc_logprobs: Sequence[tuple[float, ...]]) -> tuple[list[QuestionTree], list[QuestionTree], int]:
            built = build_trees(batch, plans, points, continuations, mc_logprobs, mc_rewards, self.algorithm)
            return built, *trainable_trees(built, self.algorithm)

        # Behaviour log-probs of continuation tokens: a fresh forward with the current policy, which
        # sampled them; prefix tokens keep their stored values (spec §10.2).
        refs = None
        if behaviour is None:
            mc_logprobs = self.trainer.logprobs(prefixes, tokens) if flat else []
        else:
            collect = behaviour(prefixes, tokens)
            # Which paths are trained on depends on the rewards alone; their log-probs are placeholders here.
            _, provisional, _ = paths([(0.0,) * len(t) for t in tokens])
            refs = self._reference_logprobs(training_sequences(provisional, prompt_of))
            mc_logprobs = collect()
        built, trees, dropped_zero = paths(mc_logprobs)
        if self.check_batch is not None:  # before anything is trained on it
            self.check_batch(self.state.step + 1, [path for tree in trees for path in tree.paths])
        sequences = training_sequences(trees, prompt_of)
        if refs is None:
            refs = self._reference_logprobs(sequences)
        if refs is not None:
            sequences = [TrainSequence(s.prompt_ids, s.response_ids, s.old_logprobs, s.advantages, r)
                         for s, r in zip(sequences, refs, strict=True)]
        update = self.trainer.update(sequences)
        self._weights_changed = bool(sequences)
        if push:
            self._push_weights()
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


class NothingScored(FinishedGeneration):
    """An empty scored submission."""

    def __init__(self) -> None:
        super().__init__([])

    def scores(self) -> list[list[ScoredSequence | None]]:
        return []


def engine_scores(config: RunConfig) -> bool:
    """Whether the engines score the next batch during the update (split placement, spec §3.2 overlap)."""
    d = config.distributed
    return d.enabled and d.placement == "split" and d.overlap and config.algorithm.off_policy


def scoring_spec(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> ScoringSpec:
    return ScoringSpec(
        algorithm=config.algorithm, train=config.train, temperature=config.rollout.sampling.temperature,
        pad_token_id=tokenizer.pad_token_id, separators=SeparatorVocab.from_tokenizer(tokenizer),
        with_fci=needs_fci(config),
    )


def needs_fci(config: RunConfig) -> bool:
    """FCI costs a blocked attention pass: compute it only when branching or the easy filter reads it."""
    return config.algorithm.branching == "fci" or config.algorithm.easy_filter != "off"
