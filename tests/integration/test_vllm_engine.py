"""The vLLM engine on vLLM's CPU build (``.venv-vllm``), as the training loop uses it: Ray actors
running under the worker environment's interpreter, behind the ``RolloutEngine`` protocol.

One engine actor serves the module (its start costs ~15 s). Its model is a tiny Qwen2 whose
vocabulary has rows beyond the tokenizer's (like Qwen's), so out-of-vocabulary truncation can
be provoked; the weights each test needs are pushed through ``update_weights``, which is itself
under test. The same contract checks run against the hf engine in ``tests/unit/rollout``.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import ray
import torch

from attnrl.config import resolve_config
from attnrl.data.synthetic import generate_problems
from attnrl.model.loading import save_policy
from attnrl.reward.verifier import Verifier
from attnrl.rollout import GenerationRequest, RolloutEngine, SamplingParams
from attnrl.rollout.factory import build_engine
from attnrl.rollout.fingerprint import fingerprint, mismatches
from attnrl.training.backend import build_backend
from attnrl.training.loop import RLLoop
from attnrl.training.trainer import PolicyTrainer, TrainSequence
from attnrl.training.weights import WeightStream
from infra.ray_engine import RayRolloutPool, RolloutPoolError, WeightSyncError
from infra.vllm_weight_transfer import NativeWeightSender, engine_init_info
from tests import rollout_contract as contract
from tests.conftest import PROJECT_ROOT, small_overrides, small_tiny_model

pytestmark = pytest.mark.integration

# Engine and trainer run the same fp32 model, but with different kernels (oneDNN GEMMs and vLLM's
# paged attention against torch's SDPA): only the summation order differs. Logits here are O(10)
# sums of O(100) products, so float32 rounding (eps 1.2e-7) moves them by ~1e-5 at most, and
# log-softmax adds as much; 1e-4 keeps a margin while a wrong temperature (0.7 vs 1 shifts these
# log-probs by > 0.1) or one stale layer (measured: > 1e-2) fails by orders of magnitude.
TOLERANCE = 1e-4
PARAMS = SamplingParams(max_new_tokens=12)


def _config(*overrides: str):
    return resolve_config(preset="tiny", overrides=["rollout.engine=vllm", *small_overrides(), *overrides])


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    # hidden 128 as the embedded default: at that size vLLM's CPU build packs the tied LM head
    # into a kernel of its own, which a weight sync must refresh.
    model, tokenizer = small_tiny_model(contract.OOV_ROWS, hidden_size=128, num_heads=4, num_kv_heads=2)
    return model, tokenizer, save_policy(model, tokenizer, tmp_path_factory.mktemp("vllm") / "policy")


@pytest.fixture(scope="module")
def pool(local_ray, padded):
    _, tokenizer, model_dir = padded
    engine = build_engine(_config(), model_dir=model_dir, tokenizer=tokenizer, max_new_tokens=64)
    yield engine
    engine.close()


@pytest.fixture()
def plain(pool, padded):
    """Ordinary random weights (padded rows never sampled), pushed to the engine; returns the model."""
    model, tokenizer, _ = padded
    model = copy.deepcopy(model)
    model.load_state_dict(contract.steered_state(model, len(tokenizer), tokenizer.eos_token_id, "plain"))
    pool.update_weights(model.state_dict())
    return model


def _trainer(model, tokenizer, temperature=1.0, lr=None):
    config = _config(*([f"train.lr={lr}"] if lr else []))
    return PolicyTrainer(model, build_backend("torch", model, config.train) if lr else None, reference=None,
                         pad_token_id=tokenizer.pad_token_id, algorithm=config.algorithm.model_copy(update={"kl_coef": 0.0}),
                         train=config.train, temperature=temperature)


def test_the_engine_runs_vllm_in_the_worker_environment(pool):
    assert isinstance(pool, RayRolloutPool) and isinstance(pool, RolloutEngine)
    [info] = pool.actor_info
    assert Path(info["python"]).parent.parent == PROJECT_ROOT / ".venv-vllm"
    assert pool.packed == {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_n_samples_in_order_and_reproducible(pool, plain, padded):
    contract.check_n_samples_in_order_and_reproducible(pool, padded[1])


def test_each_request_is_seeded_by_its_place_in_the_call_not_by_the_engine(pool, plain, padded):
    # A pool of several engines sends each a share with the requests' positions in the whole call:
    # a share gives exactly the samples the whole call gives those requests.
    tokenizer = padded[1]
    requests = [GenerationRequest(contract.prompt(tokenizer, q), n=2) for q in ("1+2", "3+4", "5+6")]
    whole = pool.generate(requests, PARAMS, seed=9)
    share = ray.get(pool.actors[0].generate.remote(requests[1:], PARAMS, 9, [1, 2]))
    assert share == whole[1:]


def test_stop_and_per_request_limits(pool, padded):
    model, tokenizer, _ = padded
    contract.check_stop_and_length(pool, model, tokenizer)


def test_out_of_vocabulary_ids_truncate(pool, padded):
    model, tokenizer, _ = padded
    contract.check_out_of_vocabulary_truncates(pool, model, tokenizer)


def test_continuation_from_a_prefix_returns_only_new_tokens(pool, plain, padded):
    contract.check_continuation_returns_only_new_tokens(pool, padded[1])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_the_trainers(pool, plain, padded, temperature):
    tokenizer = padded[1]
    worst = contract.check_logprobs_equal_the_trainer(pool, _trainer(plain, tokenizer, temperature), tokenizer,
                                                      temperature, TOLERANCE)
    print(f"largest engine/trainer log-prob difference at T={temperature}: {worst:.2e}")


def test_weights_after_a_real_update_reach_the_engine_and_its_prefix_cache(pool, plain, padded):
    tokenizer = padded[1]
    model = copy.deepcopy(plain)
    trainer = _trainer(model, tokenizer, lr=3e-2)
    before = _trainer(copy.deepcopy(plain), tokenizer)  # the old policy, for comparison
    # A prefix long enough to fill KV blocks, generated from once: its blocks are now cached.
    prefix = contract.prompt(tokenizer, "1+2+3+4+5+6+7+8+9") + tuple(tokenizer.encode("3+3+4+5+6+7+8+9\n\n" * 3, add_special_tokens=False))
    [[cached]] = pool.generate([GenerationRequest(prefix, max_new_tokens=8)], PARAMS, seed=1)

    # One real PPO update on the engine's own samples, rewarded at random.
    groups = pool.generate([GenerationRequest(contract.prompt(tokenizer, q), n=4) for q in ("1+2", "7+1")], PARAMS, 2)
    samples = [(contract.prompt(tokenizer, q), c) for q, group in zip(("1+2", "7+1"), groups) for c in group]
    sequences = [TrainSequence(p, c.token_ids, c.logprobs, tuple([1.0 if i % 2 else -1.0] * len(c.token_ids)))
                 for i, (p, c) in enumerate(samples)]
    assert trainer.update(sequences)["optimizer_steps"] >= 1
    # Pushed as a checkpoint of a tied model stores it, without the lm_head copy: the engine's head,
    # which on CPU packs its own copy of the embedding, must follow anyway.
    state = {name: t for name, t in trainer.policy_state().items() if name != "lm_head.weight"}
    pool.update_weights(state)  # raises unless the fingerprints agree

    [reported] = pool.weights_fingerprints()
    assert mismatches(fingerprint(trainer.policy_state().items(), packed=pool.packed), reported) == []
    fixed = [contract.prompt(tokenizer, "2+2") + tuple(tokenizer.encode("2+2=4\n\n\\boxed{4}", add_special_tokens=False))]
    [engine_view] = pool.prompt_logprobs(fixed)
    [trainer_view] = trainer.logprobs([fixed[0][:1]], [fixed[0][1:]])
    assert max(abs(a - b) for a, b in zip(engine_view, trainer_view, strict=True)) <= TOLERANCE

    # The cached prefix is recomputed with the new weights: its continuation's log-probs are the
    # updated trainer's, visibly not the old policy's.
    [[fresh]] = pool.generate([GenerationRequest(prefix, max_new_tokens=8)], PARAMS, seed=1)
    new = trainer.logprobs([prefix], [fresh.token_ids])[0]
    old = before.logprobs([prefix], [fresh.token_ids])[0]
    assert max(abs(a - b) for a, b in zip(fresh.logprobs, new, strict=True)) <= TOLERANCE
    assert max(abs(a - b) for a, b in zip(fresh.logprobs, old, strict=True)) > 100 * TOLERANCE
    assert cached.token_ids  # (the first call did run)


def test_an_engine_holding_other_weights_than_the_trainer_fails_loudly(pool, plain):
    # What a transport that silently does nothing looks like: the engine keeps `plain`, the
    # pool expected other weights.
    other = copy.deepcopy(plain)
    with torch.no_grad():
        other.model.norm.weight.add_(1e-3)
    pool._expected = fingerprint(other.state_dict().items(), packed=pool.packed)
    with pytest.raises(WeightSyncError, match=r"rollout actor 0 \(vllm\) does not hold .*model.norm.weight"):
        pool._verify(0, pool.weights_fingerprints()[0])


def test_native_transfer_gives_each_engine_its_own_ranks_and_needs_cuda(pool, plain):
    # One NCCL group: the trainer is rank 0, then each engine's tensor-parallel workers in turn.
    assert [engine_init_info({"rank_offset": 1, "world_size": 5}, i, 2)["rank_offset"] for i in range(2)] == [1, 3]
    assert engine_init_info({"packed": True}, 1, 2) == {"packed": True}  # IPC has no ranks
    with pytest.raises(RuntimeError, match="'nccl' weight transfer needs CUDA"):
        NativeWeightSender(WeightStream(plain, torch.float32), pool.actors, backend="nccl", rank=0,
                           tensor_parallel_size=1, packed_modules=pool.packed)


_SOURCE_CHECK = """
import json, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from vllm.distributed.weight_transfer.base import WeightSource
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine
from attnrl.training.weights import WeightStream
from infra.vllm_weight_transfer import stream_source

model = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
seen = []
source = stream_source(WeightStream(model, torch.bfloat16), lambda: lambda name, tensor: seen.append(name))
declared = source.metadata() if callable(source.metadata) else source.metadata  # vLLM 0.32 / 0.33
checked = list(NCCLTrainerWeightTransferEngine._checked_iter(source, declared))  # vLLM's own contract check
print(json.dumps({"source": isinstance(source, WeightSource), "sent": [n for n, _ in checked], "seen": seen,
                  "dtypes": sorted({str(t.dtype) for _, t in checked}),
                  "parameters": [n for n, _ in model.named_parameters()]}))
"""


def test_the_weight_stream_is_a_vllm_weight_source_that_keeps_its_metadata_contract():
    """vLLM checks, per tensor, that the source yields what its metadata declared (the worker sizes its buffers
    from it); run in the worker environment, where vLLM is."""
    done = subprocess.run([str(PROJECT_ROOT / ".venv-vllm" / "bin" / "python"), "-c", _SOURCE_CHECK], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["source"] and result["dtypes"] == ["torch.bfloat16"]
    assert result["sent"] == result["seen"] == result["parameters"]  # every parameter once, observed as sent


def test_a_killed_engine_process_is_replaced_and_training_goes_on(pool, plain, padded):
    """SIGKILL the engine's process right after a training step submitted its generation."""
    tokenizer = padded[1]
    model = copy.deepcopy(plain)
    config = _config("train.lr=1e-3", "train.max_tokens_per_micro_batch=256")
    trainer = PolicyTrainer(model, build_backend("torch", model, config.train), reference=copy.deepcopy(model),
                            pad_token_id=tokenizer.pad_token_id, algorithm=config.algorithm, train=config.train,
                            temperature=1.0)
    killed = []

    def phases(name, fn):
        out = fn()
        if name == "generate" and not killed:
            killed.append(pool.actor_info[0]["pid"])
            os.kill(killed[0], signal.SIGKILL)
        return out

    replaced = pool.replaced_actors
    loop = RLLoop(config, problems=generate_problems(config.data.synthetic, split="train", seed=1), engine=pool,
                  trainer=trainer, tokenizer=tokenizer, verifier=Verifier(timeout_s=5.0), phases=phases)
    assert len(loop.run(1)) == 1 and loop.state.step == 1
    assert killed and pool.replaced_actors == replaced + 1 and pool.actor_info[0]["pid"] != killed[0]
    assert len(loop.run(2)) == 2 and loop.state.step == 2  # training goes on with the replacement
    [reported] = pool.weights_fingerprints()
    assert mismatches(fingerprint(trainer.policy_state().items(), packed=pool.packed), reported) == []


def test_an_engine_that_failed_during_a_call_is_never_reused(pool, padded):
    """Last in the module: it leaves the pool's engine failed. vLLM keeps a failed call's requests
    scheduled, so a later call on that engine would spin forever; instead it fails at once and the
    pool replaces the engine (here with no replacements allowed, so the error surfaces)."""
    pool.max_actor_restarts = 0
    with pytest.raises(RolloutPoolError, match=r"rollout actor 0 failed during generate .*IndexError"):
        pool.generate([GenerationRequest((10_000,))], PARAMS, 0)  # beyond the model's vocabulary
    with pytest.raises(RolloutPoolError, match="failed before"):
        pool.generate([GenerationRequest(contract.prompt(padded[1], "1+1"))], PARAMS, 0)
