"""The loops of spec §3 on a tiny model: generation calls per step, what each method trains."""

from __future__ import annotations

import copy

from attnrl.config import resolve_config
from attnrl.data.synthetic import generate_problems
from attnrl.reward.verifier import Verifier
from attnrl.rollout.hf_engine import HFRolloutEngine
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

    def generate(self, requests, params, seed):
        self.calls.append((tuple(self.phases.stack), len(requests)))
        return super().generate(requests, params, seed)


def _loop(tiny_policy, method):
    model, tokenizer = tiny_policy
    model = copy.deepcopy(model)
    config = resolve_config(preset="tiny", method=method, overrides=[*small_overrides(), *SETTINGS])
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
    # the continuations of C and the initial samples of D, both inside the step's one "generate" phase.
    assert loop.state.generation_calls == 4 and len(metrics) == 3
    assert [phases for phases, _ in engine.calls] == [("bootstrap", "generate")] + [
        (f"step-{k}", "generate") for k in (1, 1, 2, 2, 3, 3)
    ] or metrics[0]["branch_points"] == 0
    steps = [ran for ran in engine.phases.ran if len(ran) == 1]
    assert steps == [("bootstrap",), ("step-1",), ("step-2",), ("step-3",)]
    assert ("step-2", "update") in engine.phases.ran and ("step-2", "score") in engine.phases.ran
    assert loop.state.step == 3 and loop.state.pending_scored is not None


def test_two_step_on_policy_makes_two_calls_per_step(tiny_policy):
    loop, engine = _loop(tiny_policy, "treerl")
    metrics = loop.run(2)
    assert [phases for phases, _ in engine.calls] == [
        ("step-1", "generate"), ("step-1", "generate-continuations"),
        ("step-2", "generate"), ("step-2", "generate-continuations"),
    ]
    # TreeRL expands every response at N entropy points (spec §13.2): 4 prompts × 4 × 2 requests.
    assert engine.calls[1][1] == 4 * 4 * 2 and metrics[0]["branch_points"] == 32


def test_grpo_trains_every_initial_response_with_one_call(tiny_policy):
    loop, engine = _loop(tiny_policy, "grpo")
    metrics = loop.run(2)
    assert len(engine.calls) == 2
    assert [m["train_sequences"] for m in metrics] == [16.0, 16.0]
    assert all(m["branch_points"] == 0 for m in metrics)


SPEC_METRICS = ["reward", "accuracy", "entropy", "response_length", "solve_all_ratio_mc", "solve_none_ratio_mc",
                "valid_prompt_ratio", "valid_token_ratio", "filtered_ratio", "prompt_batch_size", "generated_tokens",
                "step_time_s"]


def test_every_step_reports_the_spec_metrics(tiny_policy):
    loop, _ = _loop(tiny_policy, "attnrl")
    [metrics] = loop.run(1)
    assert [key for key in SPEC_METRICS if key not in metrics] == []
    assert 0.0 <= metrics["valid_token_ratio"] <= 1.0 and metrics["prompt_batch_size"] == 4


def test_token_budget_stops_training(tiny_policy):
    loop, _ = _loop(tiny_policy, "grpo")
    loop.config.train.max_generated_tokens = 1
    assert len(loop.run(5)) == 1


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
