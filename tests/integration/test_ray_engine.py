"""``RayRolloutPool`` on a real local Ray (no mocks): order, reproducibility, weight pushes, and
an actor killed in the middle of a training step."""

from __future__ import annotations

import copy

import pytest
import torch

ray = pytest.importorskip("ray")

from attnrl.config import resolve_config  # noqa: E402
from attnrl.data.synthetic import generate_problems  # noqa: E402
from attnrl.model.loading import PolicyBundle, save_policy  # noqa: E402
from attnrl.reward.verifier import Verifier  # noqa: E402
from attnrl.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams, submit_generation  # noqa: E402
from attnrl.rollout.factory import build_engine  # noqa: E402
from attnrl.rollout.hf_engine import HFRolloutEngine  # noqa: E402
from attnrl.training.backend import TorchBackend  # noqa: E402
from attnrl.training.loop import RLLoop  # noqa: E402
from attnrl.training.trainer import PolicyTrainer  # noqa: E402
from attnrl.utils.seeding import derive_seed  # noqa: E402
from infra.ray_engine import RayRolloutPool, split_contiguous  # noqa: E402
from tests.conftest import small_overrides  # noqa: E402

pytestmark = pytest.mark.integration

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tiny_policy, tmp_path_factory):
    model, tokenizer = tiny_policy
    return save_policy(model, tokenizer, tmp_path_factory.mktemp("ray") / "policy")


@pytest.fixture(scope="module")
def pool(local_ray, model_dir):
    pool = RayRolloutPool(model_dir, num_actors=2, num_cpus_per_actor=0.5)
    yield pool
    pool.close()


def _requests(tokenizer) -> list[GenerationRequest]:
    texts = ["1+2", "3+4+5", "6", "7+8", "9+1+2+3", "4"]
    return [GenerationRequest(tuple(tokenizer.encode(t)), n=1 + i % 2) for i, t in enumerate(texts)]


def _local(model, tokenizer, requests, seed, num_actors=2):
    """What the pool should return: the hf engine on each contiguous chunk with its derived seed."""
    engine = HFRolloutEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    out = []
    for i, (start, stop) in enumerate(split_contiguous(len(requests), num_actors)):
        out.extend(engine.generate(requests[start:stop], PARAMS, derive_seed(seed, i)))
    return out


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
    # Each actor's contiguous chunk is exactly the hf engine's output with the derived seed.
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
    expected = sum(float(p.double().sum()) for p in other.state_dict().values())
    assert pool.weights_fingerprints() == pytest.approx([expected] * 2)
    after = pool.generate(requests, PARAMS, seed=3)
    assert _tokens(after) != _tokens(before)
    assert _tokens(after) == _tokens(_local(other, tokenizer, requests, seed=3))

    # An actor that dies between calls is replaced at the next call and gets the latest weights.
    replaced = pool.replaced_actors
    ray.kill(pool.actors[1], no_restart=True)
    assert pool.generate(requests, PARAMS, seed=3) == after
    assert pool.replaced_actors == replaced + 1
    assert pool.weights_fingerprints() == pytest.approx([expected] * 2)

    pool.update_weights(model.state_dict())  # leave the shared pool as it was
    assert pool.generate(requests, PARAMS, seed=3) == before


class KillOnceDuringGenerate(RayRolloutPool):
    """Kills actor 0 right after the first chunk is submitted: it dies in the middle of a call."""

    killed = False

    def _submit(self, index, requests, params, seed):
        ref = super()._submit(index, requests, params, seed)
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
        overrides=[*small_overrides(), "rollout.sampling.max_new_tokens=8", "train.micro_batch_sequences=8",
                   "train.lr=1e-3"],
    )
    trainer = PolicyTrainer(
        model, TorchBackend(model, config.train), reference=copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id,
        algorithm=config.algorithm, train=config.train, temperature=1.0,
    )
    pool = KillOnceDuringGenerate(model_dir, num_actors=2, num_cpus_per_actor=0.5, max_actor_restarts=2,
                                  initial_state_dict=model.state_dict())
    try:
        loop = RLLoop(config, problems=generate_problems(config.data.synthetic, split="train", seed=1),
                      engine=pool, trainer=trainer, tokenizer=tokenizer, verifier=Verifier(timeout_s=5.0))
        first = loop.run(1)
        assert KillOnceDuringGenerate.killed and pool.replaced_actors == 1
        assert len(first) == 1 and loop.state.step == 1
        # Training goes on, and the replacement holds the trainer's latest weights.
        metrics = loop.run(2)  # run() trains up to a total and returns every step's metrics
        assert len(metrics) == 2 and loop.state.step == 2 and pool.replaced_actors == 1
        expected = sum(float(p.double().sum()) for p in trainer.policy_state().values())
        assert pool.weights_fingerprints() == pytest.approx([expected] * 2)
    finally:
        pool.close()


def test_build_engine_returns_a_pool_with_the_trainers_weights_when_enabled(local_ray, tiny_policy, model_dir):
    model, tokenizer = tiny_policy
    current = _perturbed(model, seed=5)  # the in-memory weights differ from the directory's
    config = resolve_config(preset="tiny", overrides=["rollout.engine=hf", "rollout.ray.enabled=true",
                                                      "rollout.ray.num_actors=1", "rollout.ray.num_cpus_per_actor=0.5"])
    engine = build_engine(PolicyBundle(current, tokenizer, model_dir), config.rollout)
    try:
        assert isinstance(engine, RayRolloutPool)
        expected = sum(float(p.double().sum()) for p in current.state_dict().values())
        assert engine.weights_fingerprints() == pytest.approx([expected])
    finally:
        engine.close()


def test_split_is_contiguous_and_balanced():
    assert split_contiguous(5, 2) == [(0, 3), (3, 5)]
    assert split_contiguous(1, 3) == [(0, 1), (1, 1), (1, 1)]


def test_ray_needs_the_hf_engine(tiny_policy, tmp_path):
    from attnrl.errors import ConfigError

    model, tokenizer = tiny_policy
    config = resolve_config(preset="tiny", overrides=["rollout.engine=vllm", "rollout.ray.enabled=true"])
    with pytest.raises(ConfigError, match="rollout.engine"):
        build_engine(PolicyBundle(model, tokenizer, tmp_path), config.rollout)
