"""The loops of spec §3 on a tiny model: generation calls per step, what each method trains."""

from __future__ import annotations

import copy

import pytest
import torch

from attnrl.config import resolve_config
from attnrl.data.synthetic import generate_problems
from attnrl.errors import TrainingStalled
from attnrl.reward.verifier import Verifier
from attnrl.rollout.engine import FinishedGeneration
from attnrl.rollout.hf_engine import HFRolloutEngine
from attnrl.rollout.scoring import RolloutScorer, scoring_spec
from attnrl.training.backend import build_backend
from attnrl.training.loop import RLLoop
from attnrl.training.trainer import PolicyTrainer
from tests.conftest import small_overrides

SETTINGS = [
    "rollout.sampling.max_new_tokens=12",
    "train.max_tokens_per_micro_batch=256",
    "train.lr=1e-3",
    "algorithm.min_branch_position=0",
    "algorithm.min_branch_spacing=0",
]


class PhaseRecorder:
    """A phase runner that remembers which phases ran, nested as the loop runs them."""

    def __init__(self):
        self.stack: list[str] = []
        self.ran: list[tuple[str, ...]] = []

    def __call__(self, name, fn):
        self.stack.append(name)
        self.ran.append(tuple(self.stack))
        try:
            return fn()
        finally:
            self.stack.pop()


class CountingEngine(HFRolloutEngine):
    """The real engine, recording each call's request count and the phase it ran in."""

    def __init__(self, *args, phases: PhaseRecorder, **kwargs):
        super().__init__(*args, **kwargs)
        self.phases = phases
        self.calls: list[tuple[tuple[str, ...], int]] = []
        self.tokens = 0  # generated, counted here independently of the loop

    def generate(self, requests, params, seed):
        self.calls.append((tuple(self.phases.stack), len(requests)))
        out = super().generate(requests, params, seed)
        self.tokens += sum(len(c.token_ids) for group in out for c in group)
        return out


def _loop(tiny_policy, method, *overrides):
    model, tokenizer = tiny_policy
    model = copy.deepcopy(model)
    config = resolve_config(preset="tiny", method=method, overrides=[*small_overrides(), *SETTINGS, *overrides])
    phases = PhaseRecorder()
    engine = CountingEngine(copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, phases=phases)
    trainer = PolicyTrainer(
        model, build_backend("torch", model, config.train), reference=copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id,
        algorithm=config.algorithm, train=config.train, temperature=1.0,
    )
    problems = generate_problems(config.data.synthetic, split="train", seed=1)
    verifier = Verifier(timeout_s=5.0)
    loop = RLLoop(config, problems=problems, engine=engine, trainer=trainer, tokenizer=tokenizer, verifier=verifier,
                  phases=phases)
    return loop, engine


def test_one_step_off_policy_makes_one_generation_round_per_step(tiny_policy):
    loop, engine = _loop(tiny_policy, "attnrl")
    metrics = loop.run(3)
    # Bootstrapping round (initial samples of batch 1), then one round per training step (spec §3.2):
    # the continuations of C (in up to rollout.continuation_parts submissions) and the initial samples
    # of D, all inside the step's one "generate" phase.
    assert loop.state.generation_calls == 4 and len(metrics) == 3
    calls = [phases for phases, _ in engine.calls]
    assert calls[0] == ("bootstrap", "generate") and set(calls[1:]) == {(f"step-{k}", "generate") for k in (1, 2, 3)}
    parts = loop.config.rollout.continuation_parts
    for k, metric in enumerate(metrics, start=1):
        continuation_calls = calls.count((f"step-{k}", "generate")) - 1
        assert (continuation_calls == 0) == (metric["branch_points"] == 0)
        assert continuation_calls <= min(parts, metric["branch_points"])
    assert any(calls.count((f"step-{k}", "generate")) > 2 for k in (1, 2, 3))  # the parts of a round
    steps = [ran for ran in engine.phases.ran if len(ran) == 1]
    assert steps == [("bootstrap",), ("step-1",), ("step-2",), ("step-3",)]
    assert ("step-2", "update") in engine.phases.ran and ("step-2", "score") in engine.phases.ran
    assert loop.state.step == 3 and loop.state.pending_scored is not None


def test_two_step_on_policy_makes_two_calls_per_step(tiny_policy):
    loop, engine = _loop(tiny_policy, "treerl")
    metrics = loop.run(2)
    # Two calls per round; a round the filters leave nothing of is no step, and its step runs again.
    calls = [phases for phases, _ in engine.calls]
    assert calls[0::2] == [(name, "generate") for name, _ in calls[1::2]]
    assert [phase for _, phase in calls[1::2]] == ["generate-continuations"] * (len(calls) // 2)
    assert calls[-1] == ("step-2", "generate-continuations") and len(metrics) == 2
    # TreeRL expands every response at N entropy points (spec §13.2): 4 prompts × 4 × 2 requests.
    assert engine.calls[1][1] == 4 * 4 * 2 and metrics[-1]["branch_points"] == engine.calls[-1][1]


def test_grpo_trains_every_initial_response_with_one_call(tiny_policy):
    loop, engine = _loop(tiny_policy, "grpo")
    metrics = loop.run(2)
    assert len(engine.calls) == 2
    assert [m["train_sequences"] for m in metrics] == [16.0, 16.0]
    assert all(m["branch_points"] == 0 for m in metrics)


SPEC_METRICS = ["reward", "accuracy", "entropy", "response_length", "solve_all_ratio_mc", "solve_none_ratio_mc",
                "valid_ratio_mc", "valid_ratio_all", "correct_once_twice_invalid_ratio", "incorrect_once_filtered_ratio",
                "valid_token_ratio", "filtered_ratio_all", "easy_filtered_ratio", "prompt_batch_size",
                "generated_tokens", "step_time_s"]


def test_every_step_reports_the_spec_metrics(tiny_policy):
    loop, _ = _loop(tiny_policy, "attnrl")
    [metrics] = loop.run(1)
    assert [key for key in SPEC_METRICS if key not in metrics] == []
    assert 0.0 <= metrics["valid_token_ratio"] <= 1.0 and metrics["prompt_batch_size"] == 4


@pytest.mark.parametrize("method", ["attnrl", "treerl", "grpo"])
def test_the_token_budget_binds_inside_a_step_and_every_generated_batch_is_trained(tiny_policy, method):
    # A first run without a budget prices the method's steps; the budget then ends 0.3 of a step after its
    # third: taking the fourth batch whole would overshoot by most of a step, cutting it to what fits takes none.
    unbounded, _ = _loop(tiny_policy, method)
    steps = unbounded.run(3)
    budget = int(steps[-1]["total_generated_tokens"] + 0.3 * sum(m["generated_tokens"] for m in steps) / len(steps))
    loop, engine = _loop(tiny_policy, method, f"train.max_generated_tokens={budget}")
    metrics = loop.run(50)
    spent = loop.state.generated_tokens
    assert spent == engine.tokens  # every generated token is counted
    # The budget, not the step count, stopped the run: the last batch was cut to what fitted (not below half),
    # so the run ends within half a batch's cost of the budget, either side (the old rule, checked between
    # steps, overshot by up to a whole step), and no further batch fits.
    costs = loop.state.costs
    prompt_cost = costs.initial + (costs.continuation if loop.branches else 0.0)
    assert abs(spent - budget) < 0.5 * loop._batch_size() * prompt_cost
    assert loop._prompts_to_sample() == 0
    # Every generated batch was trained on: the off-policy pipeline drained (no sampled or scored batch left).
    assert not loop.state.pending_prompts and not loop.state.pending_scored
    assert costs.continued_prompts == costs.initial_prompts  # each went through a training round


class EmptyingEngine(HFRolloutEngine):
    """The real engine, but every third completion comes back empty, as when the first sampled id
    is out of the vocabulary (spec §5.4)."""

    def generate(self, requests, params, seed):
        from attnrl.rollout.engine import Completion

        out = super().generate(requests, params, seed)
        count = 0
        for group in out:
            for i, completion in enumerate(group):
                count += 1
                if count % 3 == 0:
                    group[i] = Completion((), (), "oov")
        return out


def test_empty_completions_are_left_out_of_scoring_trees_and_training(tiny_policy):
    model, tokenizer = tiny_policy
    for method in ("attnrl", "treerl", "grpo"):
        config = resolve_config(preset="tiny", method=method, overrides=[*small_overrides(), *SETTINGS])
        trained = copy.deepcopy(model)
        trainer = PolicyTrainer(trained, build_backend("torch", trained, config.train), reference=copy.deepcopy(model),
                                pad_token_id=tokenizer.pad_token_id, algorithm=config.algorithm, train=config.train,
                                temperature=1.0)
        engine = EmptyingEngine(copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
        loop = RLLoop(config, problems=generate_problems(config.data.synthetic, split="train", seed=1), engine=engine,
                      trainer=trainer, tokenizer=tokenizer, verifier=Verifier(timeout_s=5.0))
        assert len(loop.run(2)) == 2, method
        if loop.state.pending_scored:  # the off-policy loop's next batch: no empty response kept
            assert all(r.token_ids for q in loop.state.pending_scored for r in q.responses)


class SleepingEngine(CountingEngine):
    """Records generation, sleep/wake and weight loads in order (what colocated engines are asked to do)."""

    def __init__(self, *args, events: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.events = events

    def generate(self, requests, params, seed):
        self.events.append("generate")
        return super().generate(requests, params, seed)

    def sleep(self):
        self.events.append("sleep")

    def wake(self):
        self.events.append("wake")

    def update_weights(self, state_dict):
        self.events.append("weights")
        super().update_weights(state_dict)


def _colocated_loop(tiny_policy, method, events):
    loop, engine = _loop(tiny_policy, method)
    loop.colocated = True  # what distributed.enabled + placement=colocated set (a unit test runs it in-process)
    model, tokenizer = tiny_policy
    sleeping = SleepingEngine(copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, phases=engine.phases, events=events)
    loop.engine = sleeping
    for name in ("score", "update", "logprobs"):
        work = getattr(loop.trainer, name)
        setattr(loop.trainer, name, lambda *a, _work=work, _name=name, **k: (events.append(_name), _work(*a, **k))[1])
    return loop


def test_colocated_engines_sleep_whenever_the_trainer_works(tiny_policy):
    for method, steps in (("attnrl", 2), ("treerl", 1)):
        events: list[str] = []
        loop = _colocated_loop(tiny_policy, method, events)
        metrics = loop.run(steps)
        asleep = False
        for event in events:
            if event in ("sleep", "wake"):
                assert asleep == (event == "wake"), (method, events)
                asleep = event == "sleep"
            elif event in ("generate", "weights"):
                assert not asleep, f"{method}: the engines {event} while asleep: {events}"
            else:
                assert asleep, f"{method}: the trainer ran {event} beside awake engines: {events}"
        assert not asleep and events.count("sleep") >= steps, (method, events)
        # New weights are pushed (awake) after every step that trained on something.
        assert events.count("weights") == sum(m["train_sequences"] > 0 for m in metrics), (method, events)


class EverythingRight(Verifier):
    """Scores every response 1.0: each question's responses agree, so the filters drop them all (spec §7.6)."""

    def score_batch(self, items):
        return [1.0] * len(items)


def test_a_round_with_nothing_to_train_on_is_no_step_and_a_stalled_run_stops(tiny_policy):
    for method, rounds in (("attnrl", 1 + 3), ("treerl", 3)):  # the off-policy loop's bootstrap, then 3
        loop, engine = _loop(tiny_policy, method)
        loop.verifier = EverythingRight(timeout_s=5.0)
        loop.config.train.max_rounds_without_update = 3
        weights = {k: v.clone() for k, v in loop.trainer.policy_state().items()}
        size = loop.controller.size
        seen = []
        with pytest.raises(TrainingStalled, match="3 generation rounds in a row left nothing to train on after step 0"):
            loop.run(2, on_step=seen.append)
        # No update, no step, no metrics, no on_step (which is where the train stage checkpoints).
        assert loop.state.step == 0 and loop.state.metrics == [] and seen == [], method
        assert loop.state.generation_calls == (rounds if method == "attnrl" else 2 * rounds), method
        assert all(torch.equal(v, weights[k]) for k, v in loop.trainer.policy_state().items()), method
        if loop.algorithm.adaptive_batch:  # B'' = 0 each round: the batch grows (spec §7.5)
            assert loop.controller.size > size, method


class RecordingTrainer(PolicyTrainer):
    """The real trainer; before each update it records, per sequence, its stored behaviour log-probs next to
    what the policy (the weights that sampled them, on-policy) and the reference give now."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[list, list, list]] = []

    def update(self, sequences):
        prompts, responses = [s.prompt_ids for s in sequences], [s.response_ids for s in sequences]
        self.seen.append(([s.old_logprobs for s in sequences], self.logprobs(prompts, responses),
                          self.logprobs(prompts, responses, reference=True)))
        return super().update(sequences)


def test_behaviour_logprobs_come_from_the_policy_and_the_batch_size_hears_the_filtered_count(tiny_policy):
    model, tokenizer = tiny_policy
    # Two-step on-policy: every stored log-prob (initial samples and continuations) is the current policy's.
    loop, _ = _loop(tiny_policy, "treerl")
    config = loop.config
    trained = copy.deepcopy(model)
    loop.trainer = RecordingTrainer(trained, build_backend("torch", trained, config.train), reference=copy.deepcopy(model),
                                    pad_token_id=tokenizer.pad_token_id, algorithm=config.algorithm,
                                    train=config.train, temperature=1.0)
    loop.run(2)
    assert len(loop.trainer.seen) == 2
    for stored, policy, reference in loop.trainer.seen:
        for s, p in zip(stored, policy, strict=True):
            assert s == pytest.approx(p, abs=1e-5)
    # After the first update the policy is no longer the reference: a pass on the wrong model shows.
    stored, _, reference = loop.trainer.seen[1]
    assert max(abs(a - b) for s, r in zip(stored, reference) for a, b in zip(s, r)) > 1e-3

    # The adaptive batch size is fed B'', the paths left after the zero-advantage filter (spec §7.5).
    loop, _ = _loop(tiny_policy, "attnrl")
    fed: list[int] = []
    next_size = loop.controller.next_size
    loop.controller.next_size = lambda valid: (fed.append(valid), next_size(valid))[1]
    metrics = loop.run(3)
    assert [f for f in fed if f] == [int(m["train_sequences"]) for m in metrics]
    assert any(m["zero_advantage_dropped"] > 0 for m in metrics)  # the filter dropped paths: pre ≠ post


class ScoredGeneration(FinishedGeneration):
    """A finished ``submit_scored`` call: its completions and the engine's scores of them."""

    def __init__(self, completions, scores, events, name):
        super().__init__(completions)
        self._scores, self._events, self._name = scores, events, name

    def result(self):
        self._events.append(self._name)
        return super().result()

    def scores(self):
        return self._scores


class ScoringEngine(HFRolloutEngine):
    """The real engine, scoring what it generates with its own weights, as the Ray pool's engines do
    (``submit_scored``), and logging when the loop collects each scored call."""

    def __init__(self, *args, spec, events, **kwargs):
        super().__init__(*args, **kwargs)
        self.scorer, self.events = RolloutScorer(self.model, spec), events

    def submit_scored(self, requests, params, seed, kind="sequences"):
        completions = self.generate(requests, params, seed)
        return ScoredGeneration(completions, self.scorer.run(kind, requests, completions), self.events,
                                f"collect {kind}")


def _engine_scored_loop(tiny_policy, overlap: bool, events: list[str]):
    loop, _ = _loop(tiny_policy, "attnrl", "train.mini_batch_sequences=4")
    loop.engine_scores = overlap  # what distributed.enabled, placement=split and overlap set (here in-process)
    model, tokenizer = tiny_policy
    loop.engine = ScoringEngine(copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id,
                                spec=scoring_spec(loop.config, tokenizer), events=events)
    update = loop.trainer.update
    loop.trainer.update = lambda sequences: (events.append(f"update {len(sequences)}"), update(sequences))[1]
    return loop


def test_with_engine_scores_the_update_streams_mini_batches_and_trains_like_the_serial_loop(tiny_policy):
    serial_events: list[str] = []
    serial = _engine_scored_loop(tiny_policy, overlap=False, events=serial_events)
    streamed_events: list[str] = []
    streamed = _engine_scored_loop(tiny_policy, overlap=True, events=streamed_events)
    expected, metrics = serial.run(3), streamed.run(3)

    # The same samples, trees and mini-batches: bit-identical weights, the same metrics.
    timing = ("step_time_s", "phase_s")
    assert [{k: v for k, v in m.items() if not k.startswith(timing)} for m in metrics] == [
        {k: v for k, v in m.items() if not k.startswith(timing)} for m in expected]
    for (name, mine), (_, theirs) in zip(streamed.trainer.model.state_dict().items(),
                                         serial.trainer.model.state_dict().items(), strict=True):
        assert torch.equal(mine, theirs), name
    # The serial loop updates once per step, on everything; the streamed one on each full mini-batch
    # of 4 as soon as its parts are back, before the later parts are collected.
    assert all(not e.startswith("collect") for e in serial_events)
    assert [e for e in serial_events if e.startswith("update")] == [f"update {int(m['train_sequences'])}"
                                                                     for m in expected]
    assert all(e in ("update 4", "collect logprobs", "collect sequences") or e.startswith("update ")
               for e in streamed_events)
    first_update = streamed_events.index("update 4")
    assert "collect logprobs" in streamed_events[first_update:], streamed_events
    assert sum(m["update/optimizer_steps"] for m in metrics) == sum(
        -(-int(m["train_sequences"]) // 4) for m in metrics)
