from __future__ import annotations

import copy

import pytest
import torch

from attnrl.config import resolve_config
from attnrl.rollout import GenerationRequest, RolloutEngine, SamplingParams
from attnrl.rollout.hf_engine import HFRolloutEngine, SampledLogprobs
from attnrl.training.trainer import PolicyTrainer
from tests import rollout_contract as contract
from tests.conftest import small_tiny_model


def _engine(model, tokenizer, batch_size=4):
    return HFRolloutEngine(copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, vocab_size=len(tokenizer), batch_size=batch_size)


@pytest.fixture()
def engine(tiny_policy):
    return _engine(*tiny_policy)


@pytest.fixture(scope="module")
def padded():
    """A tiny model with OOV_ROWS rows beyond the tokenizer: the steerable one."""
    return small_tiny_model(extra_vocab_rows=contract.OOV_ROWS)


def test_it_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine)


def test_n_samples_in_order_and_reproducible(engine, tiny_policy):
    contract.check_n_samples_in_order_and_reproducible(engine, tiny_policy[1])


def test_stop_and_per_request_limits(padded):
    model, tokenizer = padded
    contract.check_stop_and_length(_engine(model, tokenizer), model, tokenizer)


def test_out_of_vocabulary_ids_truncate(padded):
    model, tokenizer = padded
    contract.check_out_of_vocabulary_truncates(_engine(model, tokenizer), model, tokenizer)


def test_continuation_from_a_prefix_returns_only_new_tokens(engine, tiny_policy):
    contract.check_continuation_returns_only_new_tokens(engine, tiny_policy[1])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_the_trainers(engine, tiny_policy, temperature):
    model, tokenizer = tiny_policy
    config = resolve_config(preset="tiny")
    trainer = PolicyTrainer(engine.model, None, reference=None, pad_token_id=tokenizer.pad_token_id,
                            algorithm=config.algorithm, train=config.train, temperature=temperature)
    # Same weights, same fp32 forward on left-padded rows: only summation order differs.
    contract.check_logprobs_equal_the_trainer(engine, trainer, tokenizer, temperature, tolerance=1e-5)


def test_top_p_logprobs_are_renormalised_over_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    recorder = SampledLogprobs(temperature=1.0, top_p=0.7)
    warped = recorder(torch.tensor([[5]]), logits.clone())
    assert torch.isinf(warped[0, 2:]).all()  # outside the nucleus
    [[logprob]] = recorder.finish(torch.tensor([[1]])).tolist()
    assert logprob == pytest.approx(float(torch.log_softmax(logits[0, :2], -1)[1]))


def test_recorder_keeps_one_distribution_not_every_steps_logits(tiny_policy):
    model, tokenizer = tiny_policy
    recorder = SampledLogprobs(temperature=1.0, top_p=1.0)
    ids = torch.tensor([[1, 2]])
    for step in range(5):
        recorder(ids, torch.randn(1, len(tokenizer)))
        ids = torch.cat([ids, torch.tensor([[3 + step]])], dim=1)
    assert recorder._previous.shape == (1, len(tokenizer))  # O(rows × vocab), once
    assert all(t.shape == (1,) for t in recorder._steps)
    assert recorder.finish(ids[:, 2:]).shape == (1, 5)


def test_update_weights_changes_what_is_sampled(engine, tiny_policy):
    model, tokenizer = tiny_policy
    params = SamplingParams(max_new_tokens=8)
    requests = [GenerationRequest(contract.prompt(tokenizer, "3+5"), n=3)]
    before = engine.generate(requests, params, seed=5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    engine.update_weights(other.state_dict())
    assert engine.generate(requests, params, seed=5) != before
    assert torch.equal(engine.model.lm_head.weight, other.lm_head.weight)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0}, {"top_p": 0}, {"top_p": 1.1}, {"max_new_tokens": 0}]
)
def test_invalid_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_invalid_requests():
    with pytest.raises(ValueError):
        GenerationRequest(())
    with pytest.raises(ValueError):
        GenerationRequest((1,), n=0)
