"""``RayRolloutPool`` of hf engines on a real local Ray (no mocks): order, reproducibility, weight
pushes with their fingerprints, and an actor killed in the middle of a training step."""

from __future__ import annotations

import copy
import time

import pytest
import ray
import torch

from attnrl.config import resolve_config
from attnrl.data.synthetic import generate_problems
from attnrl.model.loading import save_policy
from attnrl.reward.verifier import Verifier
from attnrl.rollout.balance import assign_by_tokens
from attnrl.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams, submit_generation
from attnrl.rollout.factory import build_engine
from attnrl.rollout.fingerprint import fingerprint, mismatches
from attnrl.rollout.hf_engine import HFRolloutEngine
from attnrl.training.backend import build_backend
from attnrl.training.loop import RLLoop
from attnrl.training.trainer import PolicyTrainer
from attnrl.utils.seeding import derive_seed
from infra.engine_worker import EngineWorker
from infra.ray_engine import EngineSpec, RayRolloutPool, RolloutPoolError
from tests.conftest import small_overrides

pytestmark = pytest.mark.integration

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def model_dir(tiny_policy, tmp_path_factory):
    model, tokenizer = tiny_policy
    return save_policy(model, tokenizer, tmp_path_factory.mktemp("ray") / "policy")


def _spec(model_dir):
    return EngineSpec("hf", {"model_path": str(model_dir), "dtype": "float32", "device": "cpu", "batch_size": 64,
                             "threads": 1}, dtype="float32")


@pytest.fixture(scope="module")
def pool(local_ray, model_dir):
    pool = RayRolloutPool(_spec(model_dir), num_actors=2, num_cpus_per_actor=0.5, num_gpus_per_actor=0)
    yield pool
    pool.close()


def _requests(tokenizer) -> list[GenerationRequest]:
    texts = ["1+2", "3+4+5", "6", "7+8", "9+1+2+3", "4"]
    return [GenerationRequest(tuple(tokenizer.encode(t)), n=1 + i % 2) for i, t in enumerate(texts)]


def _local(model, tokenizer, requests, seed, num_actors=2):
    """What the pool should return: the hf engine on each actor's share with its derived seed."""
    engine = HFRolloutEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             vocab_size=len(tokenizer))
    out = [None] * len(requests)
    for i, share in enumerate(assign_by_tokens(requests, num_actors, PARAMS.max_new_tokens)):
        if share:
            for k, completions in zip(share, engine.generate([requests[k] for k in share], PARAMS, derive_seed(seed, i))):
                out[k] = completions
    return out


def _holds(pool, model):
    """Every actor's fingerprint equals ``model``'s weights."""
    expected = fingerprint(model.state_dict().items())
    return all(mismatches(expected, reported) == [] for reported in pool.weights_fingerprints())


def _tokens(results):
    return [[c.token_ids for c in completions] for completions in results]


def _perturbed(model, seed):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    return other


def test_pool_keeps_request_order_and_is_reproducible(pool, tiny_policy):
    model, tokenizer = tiny_policy
    assert isinstance(pool, RolloutEngine)
    requests = _requests(tokenizer)
    first = pool.generate(requests, PARAMS, seed=7)
    assert [len(c) for c in first] == [r.n for r in requests]
    assert pool.generate(requests, PARAMS, seed=7) == first
    # Each actor's share is exactly the hf engine's output with the derived seed.
    assert _tokens(first) == _tokens(_local(model, tokenizer, requests, seed=7))
    assert pool.generate([], PARAMS, seed=7) == []


def test_background_submissions_return_what_generate_returns(pool, tiny_policy):
    """The one-step loop's overlap: two submissions in flight at once, collected later, in any order."""
    _, tokenizer = tiny_policy
    requests = _requests(tokenizer)
    first, second = pool.submit(requests, PARAMS, seed=3), pool.submit(requests[:1], PARAMS, seed=4)
    assert second.result() == pool.generate(requests[:1], PARAMS, seed=4)
    assert first.result() == pool.generate(requests, PARAMS, seed=3)
    assert first.result() is first.result()  # collected once
    assert submit_generation(pool, requests, PARAMS, 3).result() == first.result()


def test_update_weights_reaches_every_actor_including_replacements(pool, tiny_policy):
    model, tokenizer = tiny_policy
    requests = _requests(tokenizer)
    before = pool.generate(requests, PARAMS, seed=3)
    other = _perturbed(model, seed=11)
    pool.update_weights(other.state_dict())
    assert _holds(pool, other) and not _holds(pool, model)
    after = pool.generate(requests, PARAMS, seed=3)
    assert _tokens(after) != _tokens(before)
    assert _tokens(after) == _tokens(_local(other, tokenizer, requests, seed=3))

    # An actor that dies between calls is replaced at the next call and gets the latest weights.
    replaced = pool.replaced_actors
    ray.kill(pool.actors[1], no_restart=True)
    assert pool.generate(requests, PARAMS, seed=3) == after
    assert pool.replaced_actors == replaced + 1
    assert _holds(pool, other)

    pool.update_weights(model.state_dict())  # leave the shared pool as it was
    assert pool.generate(requests, PARAMS, seed=3) == before


class KillOnceDuringGenerate(RayRolloutPool):
    """Kills actor 0 right after the first chunk is submitted: it dies in the middle of a call."""

    killed = False

    def _submit(self, index, requests, params, seed, keys, scored):
        ref = super()._submit(index, requests, params, seed, keys, scored)
        if not self.killed and index == 0:
            type(self).killed = True
            ray.kill(self.actors[0], no_restart=True)
        return ref


def test_an_actor_killed_during_a_training_step_is_replaced_and_training_goes_on(local_ray, tiny_policy, model_dir):
    model, tokenizer = tiny_policy
    model = copy.deepcopy(model)
    config = resolve_config(
        preset="tiny",
        method="grpo",
        overrides=[*small_overrides(), "rollout.sampling.max_new_tokens=8", "train.max_tokens_per_micro_batch=256",
                   "train.lr=1e-3"],
    )
    trainer = PolicyTrainer(
        model, build_backend("torch", model, config.train), reference=copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id,
        algorithm=config.algorithm, train=config.train, temperature=1.0,
    )
    pool = KillOnceDuringGenerate(_spec(model_dir), num_actors=2, num_cpus_per_actor=0.5, num_gpus_per_actor=0,
                                  max_actor_restarts=2, initial_state_dict=model.state_dict())
    try:
        loop = RLLoop(config, problems=generate_problems(config.data.synthetic, split="train", seed=1),
                      engine=pool, trainer=trainer, tokenizer=tokenizer, verifier=Verifier(timeout_s=5.0))
        first = loop.run(1)
        assert KillOnceDuringGenerate.killed and pool.replaced_actors == 1
        assert len(first) == 1 and loop.state.step == 1
        # Training goes on, and the replacement holds the trainer's latest weights.
        metrics = loop.run(2)  # run() trains up to a total and returns every step's metrics
        assert len(metrics) == 2 and loop.state.step == 2 and pool.replaced_actors == 1
        assert _holds(pool, trainer.model)
    finally:
        pool.close()


def test_an_actor_that_hangs_is_replaced_at_the_call_timeout_and_the_call_completes(local_ray, tiny_policy,
                                                                                   model_dir, tmp_path):
    _, tokenizer = tiny_policy
    hung_once = tmp_path / "hung-once"

    class HangsOnce(EngineWorker):  # the first actor to generate never answers; later ones are healthy
        def generate(self, *args, **kwargs):
            if not hung_once.exists():
                hung_once.touch()
                time.sleep(600)
            return super().generate(*args, **kwargs)

    class Pool(RayRolloutPool):
        worker_class = HangsOnce

    requests = _requests(tokenizer)
    pool = Pool(_spec(model_dir), num_actors=1, num_cpus_per_actor=0.5, num_gpus_per_actor=0,
                max_actor_restarts=1, call_timeout_s=5.0)
    try:
        started = time.monotonic()
        got = pool.generate(requests, PARAMS, seed=7)
        assert time.monotonic() - started < 300  # bounded by the call timeout, not by the 600 s hang
        assert hung_once.exists() and pool.replaced_actors == 1
        assert got == pool.generate(requests, PARAMS, seed=7)  # the replacement's answer is the healthy one
        # One that keeps hanging fails the call, naming the actor and the bound.
        hung_once.unlink()
        pool.max_actor_restarts = 0
        with pytest.raises(RolloutPoolError, match=r"rollout actor 0 hung during generate .* no answer in 5 s "
                                                   r"\(rollout.ray.call_timeout_s\)"):
            pool.generate(requests, PARAMS, seed=7)
    finally:
        pool.close()


def test_build_engine_returns_a_pool_with_the_trainers_weights_when_enabled(local_ray, tiny_policy, model_dir):
    model, tokenizer = tiny_policy
    current = _perturbed(model, seed=5)  # the in-memory weights differ from the directory's
    config = resolve_config(preset="tiny", overrides=["rollout.engine=hf", "rollout.ray.enabled=true",
                                                      "rollout.ray.num_actors=1", "rollout.ray.num_cpus_per_actor=0.5"])
    engine = build_engine(config, model_dir=model_dir, tokenizer=tokenizer, max_new_tokens=8, model=current)
    try:
        assert isinstance(engine, RayRolloutPool) and _holds(engine, current)
    finally:
        engine.close()
