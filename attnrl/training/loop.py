"""The RL loops of spec §3: one-step off-policy (one generation call per step) and two-step on-policy.

One training step, off-policy (spec §3.2, §3.3)::

    E        <- sample prompts (adaptive size, §7.5)
    plan     <- ADS + branch points for C (initial samples from the previous policy)
    out      <- ONE generation round with the current policy: n initial samples for D and
                T continuations per branch point of C (submitted in parts, see below)
    D        <- reward, segment, score (log-probs, entropy, FCI) with the current policy
    trees(C) <- values and advantages (§9), zero-advantage filter (§7.6)
    update on C's paths (behaviour log-probs per token, §10.2), push weights to the engine
    C, D     <- D, E

Overlap: on an engine that generates in the background (the Ray actor pool), C's continuations go
out in ``rollout.continuation_parts`` runs of whole questions, then D's initial samples, and every
engine runs them in that order. The trainer builds the trees of each part as it comes back (rewards,
behaviour log-probs with θ_k, advantages, the zero-advantage filter, reference log-probs) while the
later parts generate, so little is left between the last continuation and the update. With
``engine_scores`` (split placement, ``distributed.overlap``) the engines, which hold θ_k, also take
the behaviour log-probs of each part of continuations, so the trainer trains on each full mini-batch
of C's paths as soon as its parts are back, and they score D (log-probs, entropies, FCI) while the
trainer updates on C; the new weights are pushed once D is scored (spec §3.2's policy versions
either way). Same weights, same seeds, same samples: only the wall time changes. Each submission has
its own seed (round, part), so an engine with or without background generation returns the same
completions.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from attnrl.config.schema import RunConfig
from attnrl.data.problem import Problem
from attnrl.errors import TrainingStalled
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
from attnrl.rollout.scoring import NothingScored, ScoreKind, engine_scores, needs_fci
from attnrl.rollout.prompts import encode_prompt
from attnrl.sampling import BatchSizeController, ExpansionPlan, RunningMean
from attnrl.steps import SeparatorVocab
from attnrl.training.budget import PromptCosts
from attnrl.training.metrics import merged_update_stats, step_metrics
from attnrl.training.prompts import PromptSampler
from attnrl.training.rollouts import (
    BranchPoint,
    QuestionPart,
    ScoredQuestion,
    TreePart,
    continuation_requests,
    plan_branches,
    question_parts,
    score_initial,
)
from attnrl.training.trainer import ScoredSequence, Trainer, TrainSequence
from attnrl.training.tree_parts import TreePartBuilder
from attnrl.tree import TrainingPath
from attnrl.utils import stopping
from attnrl.utils.seeding import derive_seed

logger = logging.getLogger(__name__)

T = TypeVar("T")
PhaseRunner = Callable[[str, Callable[[], T]], T]
BatchCheck = Callable[[int, Sequence[TrainingPath]], None]  # (step, the paths it will train on)


def run_directly(name: str, fn: Callable[[], T]) -> T:
    """The default phase runner: just call it (an orchestrator passes one that records each phase)."""
    return fn()


def stop_checked(phases: PhaseRunner) -> PhaseRunner:
    """``phases`` with a stop checkpoint before every step and phase (``attnrl.utils.stopping``)."""
    def run(name: str, fn: Callable[[], T]) -> T:
        stopping.checkpoint()
        return phases(name, fn)

    return run


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
    rounds_without_update: int = 0                      # in a row: the filters left nothing to train on
    costs: PromptCosts = field(default_factory=PromptCosts)  # generated tokens per prompt (the token budget)
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
        self.phases = stop_checked(phases)
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
        self.branches = config.algorithm.advantage != "grpo"  # continuations follow the initial samples
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
        """Train until ``steps`` training steps are done in total, or no further batch fits in the token budget
        (``train.max_generated_tokens``; attnrl/training/budget.py) and none is left to train on."""
        while self.state.step < steps and self._work_left():
            started = time.perf_counter()
            step = self._off_policy_step if self.algorithm.off_policy else self._on_policy_step
            name = f"step-{self.state.step + 1}" if self._updates_this_call() else "bootstrap"
            stats = self.phases(name, step)
            if stats is None:  # the off-policy pipeline's bootstrap, or a round with nothing to train on
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
        return not self.algorithm.off_policy or bool(self.state.pending_scored)

    def _batch_size(self) -> int:
        return self.controller.size if self.algorithm.adaptive_batch else self.algorithm.prompt_batch_size

    def _prompts_to_sample(self, *, sampled: int = 0, scored: int = 0) -> int:
        """The next batch's size, cut to what fits in the token budget once the batches already taken are
        paid for: ``sampled`` prompts not generated yet, ``scored`` prompts without their continuations."""
        return self.state.costs.prompts_to_sample(
            self._batch_size(), budget=self.config.train.max_generated_tokens, spent=self.state.generated_tokens,
            sampled=sampled, scored=scored, continuations=self.branches)

    def _pipeline_holds_work(self) -> bool:
        """The off-policy pipeline holds sampled prompts or scored samples that are not trained on yet."""
        return bool(self.state.pending_scored) or bool(self.state.pending_prompts)

    def _work_left(self) -> bool:
        """A batch is still to be trained on: the pipeline holds one, or a new one fits in the budget."""
        if self.algorithm.off_policy and self._pipeline_holds_work():
            return True
        return self._prompts_to_sample() > 0

    def _prompts(self, problems: list[Problem]) -> list[tuple[int, ...]]:
        out = []
        for problem in problems:
            if problem.uid not in self._prompt_ids:
                self._prompt_ids[problem.uid] = tuple(encode_prompt(self.tokenizer, problem.prompt))
            out.append(self._prompt_ids[problem.uid])
        return out

    def _submit(self, *parts: list[GenerationRequest]) -> list[PendingGeneration]:
        """One generation round (one ``generation_calls`` tick), each part submitted with its own seed."""
        call = self._next_round()
        return [self._submit_part(call, i, requests) for i, requests in enumerate(parts)]

    def _next_round(self) -> int:
        call = self.state.generation_calls
        self.state.generation_calls += 1
        return call

    def _submit_part(self, call: int, part: int, requests: list[GenerationRequest], *,
                     scored: ScoreKind | None = None) -> PendingGeneration:
        """Part ``part`` of round ``call``: its seed depends on both only, whenever it is submitted;
        ``scored``: the engines also score it (``submit_scored``)."""
        seed = derive_seed(self.config.seed, "generate", call, part)
        if scored is not None:
            return self.engine.submit_scored(requests, self.params, seed, scored) if requests else NothingScored()
        return submit_generation(self.engine, requests, self.params, seed) if requests else FinishedGeneration([])

    def _collect(self, pending: PendingGeneration, *, initial: bool = True) -> list[list[Completion]]:
        """A submission's completions, their tokens counted: ``initial`` samples (a group per prompt) or continuations."""
        out = pending.result()
        tokens = sum(len(c.token_ids) for group in out for c in group)
        self.state.generated_tokens += tokens
        self.state.costs.add(len(out), tokens, initial=initial)
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
        if not self._pipeline_holds_work():  # the first call (or one after a drained budget) only samples (spec §3.2)
            state.pending_prompts = self.sampler.take(self._prompts_to_sample())
        current, upcoming = state.pending_scored or [], state.pending_prompts
        next_prompts = self.sampler.take(self._prompts_to_sample(sampled=len(upcoming), scored=len(current)))
        plans, points = self._plan(current) if current else ([], [])
        parts = question_parts(points, len(current), self.config.rollout.continuation_parts)
        tokens_before = state.generated_tokens
        continuations, initial_requests = self._continuation_requests(current, points), self._initial_requests(upcoming)

        def submit() -> tuple[list[PendingGeneration], PendingGeneration]:
            # The round's parts in the order they are needed, which is the order every engine runs them:
            # C's continuations, a run of questions at a time, then D's initial samples.
            call = self._next_round()
            behaviour, initial_scores = ("logprobs", "sequences") if self.engine_scores else (None, None)
            mc = [self._submit_part(call, 1 + i, continuations[part.points], scored=behaviour)
                  for i, part in enumerate(parts)]
            return mc, self._submit_part(call, 0, initial_requests, scored=initial_scores)

        stats = None
        if self.engine_scores:
            # The engines generate C's continuations, then generate and score D with θ_k while the trainer
            # builds C's trees part by part and updates on them; the new weights go out once D is scored
            # (the engines must score it with θ_k).
            mc, initial = self.phases("generate", submit)
            if current:
                stats = self.phases("update", lambda: self._train(current, plans, points, parts, mc, push=False))
            scored_next = self.phases("score", lambda: self._score(upcoming, self._collect(initial), initial.scores()))
            if current:
                self.phases("sync-weights", self._push_weights)
        elif self.colocated:
            # The engines finish the round, then sleep while the trainer scores D and updates on C.
            def generated() -> tuple[list[PendingGeneration], PendingGeneration]:
                mc, initial = submit()
                self._generated([*mc, initial])
                return mc, initial

            mc, initial = self.phases("generate", generated)
            with self._engines_asleep():
                scored_next = self.phases("score", lambda: self._score(upcoming, self._collect(initial)))
                if current:
                    stats = self.phases("update", lambda: self._train(current, plans, points, parts, mc, push=False))
            self._push_weights()
        else:
            # D's initial samples come last: the trainer builds C's trees from the parts already back while
            # the rest generate, then scores D, then updates on C.
            mc, initial = self.phases("generate", submit)
            trees = self.phases("trees", lambda: list(self._tree_parts(current, plans, points, parts, mc))) if current else []
            scored_next = self.phases("score", lambda: self._score(upcoming, self._collect(initial)))
            if current:
                stats = self.phases("update", lambda: self._update(current, plans, points, trees))
        self._round_totals(stats, tokens_before, len(current))
        state.pending_scored, state.pending_prompts = scored_next, next_prompts
        return stats

    def _on_policy_step(self) -> dict[str, float] | None:
        state = self.state
        tokens_before = state.generated_tokens
        problems = self.sampler.take(self._prompts_to_sample())
        completions = self.phases("generate", lambda: self._generate(self._initial_requests(problems)))
        with self._engines_asleep():
            scored = self.phases("score", lambda: self._score(problems, completions))
        plans, points = self._plan(scored)
        # One call, collected whole: the two-step loop of spec §3.1 runs its phases in turn.
        continuations = self.phases(
            "generate-continuations", lambda: self._generated(self._submit(self._continuation_requests(scored, points))))
        whole = question_parts(points, len(scored), 1)
        with self._engines_asleep():
            stats = self.phases("update", lambda: self._train(scored, plans, points, whole, continuations, push=False))
        self._push_weights()
        self._round_totals(stats, tokens_before, len(problems))
        return stats

    def _round_totals(self, stats: dict[str, float] | None, tokens_before: int, questions: int) -> None:
        """The step's token counts once its whole round is collected (however the phases were ordered);
        ``questions``: the prompts whose continuations the round generated."""
        self.state.costs.continued_prompts += questions
        if stats is not None:
            stats["generated_tokens"] = float(self.state.generated_tokens - tokens_before)
            stats["total_generated_tokens"] = float(self.state.generated_tokens)
            stats["prompt_batch_size"] = float(questions)

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

    def _push_weights(self) -> None:
        if self._weights_changed:
            self.trainer.push_weights(self.engine)
            self._weights_changed = False

    def _train(self, batch: list[ScoredQuestion], plans: list[ExpansionPlan], points: list[BranchPoint],
               parts: list[QuestionPart], continuations: list[PendingGeneration], *, push: bool = True
               ) -> dict[str, float] | None:
        """C's trees, part by part as the continuations come back, and the update on them (then ``push``).

        With ``engine_scores`` the engines sent the behaviour log-probs, so nothing the trainer still
        has to compute reads the policy: each full mini-batch is trained on as soon as its parts are
        back, while the engines generate the later parts. The mini-batches are the same consecutive
        runs of paths, in the same order, as those of one update on the whole batch (spec §11)."""
        return self._update(batch, plans, points, self._tree_parts(batch, plans, points, parts, continuations),
                            push=push, stream=self.engine_scores)

    def _tree_parts(self, batch: list[ScoredQuestion], plans: list[ExpansionPlan], points: list[BranchPoint],
                    parts: list[QuestionPart], continuations: list[PendingGeneration]) -> Iterator[TreePart]:
        """Each part's trees once its continuations are back (attnrl/training/tree_parts.py); the engines
        generate the later parts meanwhile. With ``engine_scores`` the engines also sent the continuations'
        behaviour log-probs."""
        builder = TreePartBuilder(self.trainer, self.tokenizer, self.verifier, self.algorithm)
        for part, pending in zip(parts, continuations, strict=True):
            yield builder.build(batch[part.questions], plans[part.questions], part.branch_points(points),
                                self._collect(pending, initial=False), pending.scores() if self.engine_scores else None)

    def _update(self, batch: list[ScoredQuestion], plans: list[ExpansionPlan], points: list[BranchPoint],
                parts: Iterable[TreePart], *, push: bool = True, stream: bool = False) -> dict[str, float] | None:
        """The update on every part's paths, in batch order, and (``push``) the new weights to the engines;
        with ``stream``, on each full mini-batch as soon as the parts that make it are here.

        Each run of paths is checked (``check_batch``) before it is trained on. None when the filters
        left nothing to train on: no update, no step (so no checkpoint); the adaptive batch size still
        hears of the empty batch and grows (spec §7.5, B'' = 0)."""
        size = self.config.train.mini_batch_sequences
        done: list[TreePart] = []
        waiting: list[tuple[TrainSequence, TrainingPath]] = []  # paths not trained on yet, with their sequences
        updates: list[dict[str, float]] = []
        for part in parts:
            done.append(part)
            waiting.extend(zip(part.sequences, (path for tree in part.trees for path in tree.paths), strict=True))
            while stream and len(waiting) >= size:
                updates.append(self._train_on(waiting[:size]))
                del waiting[:size]
        sequences = [s for part in done for s in part.sequences]
        if self.algorithm.adaptive_batch:
            self.controller.next_size(len(sequences))  # B'': the paths left after filtering
        if not sequences:
            self._nothing_to_train(len(batch))
            return None
        if waiting:
            updates.append(self._train_on(waiting))
        self.state.rounds_without_update = 0
        self._weights_changed = True
        if push:
            self._push_weights()
        self.state.step += 1
        return step_metrics(
            step=self.state.step,
            batch=batch,
            plans=plans,
            points=points,
            built=[tree for part in done for tree in part.built],
            trees=[tree for part in done for tree in part.trees],
            dropped_zero=sum(part.dropped_zero for part in done),
            sequences=sequences,
            update=merged_update_stats(updates),
        )

    def _train_on(self, run: list[tuple[TrainSequence, TrainingPath]]) -> dict[str, float]:
        """Check a run of paths (before anything is trained on it), then update on their sequences."""
        if self.check_batch is not None:
            self.check_batch(self.state.step + 1, [path for _, path in run])
        return self.trainer.update([sequence for sequence, _ in run])

    def _nothing_to_train(self, questions: int) -> None:
        state, limit = self.state, self.config.train.max_rounds_without_update
        state.rounds_without_update += 1
        logger.warning("round %d: the filters left nothing of its %d questions to train on; no update, still %d "
                       "steps done (%d such rounds in a row, train.max_rounds_without_update = %d)",
                       state.generation_calls, questions, state.step, state.rounds_without_update, limit)
        if state.rounds_without_update >= limit:
            raise TrainingStalled(
                f"{state.rounds_without_update} generation rounds in a row left nothing to train on after step "
                f"{state.step} (train.max_rounds_without_update = {limit}): every question was filtered out "
                "(spec §7.6: its responses all right or all wrong). Check the data's difficulty for this policy, "
                "or the filters (algorithm.easy_filter, algorithm.zero_advantage_filter)")
