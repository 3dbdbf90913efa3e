from __future__ import annotations

import copy

import pytest
import torch

from attnrl.rollout import GenerationRequest, RolloutEngine, SamplingParams, encode_prompt
from attnrl.rollout.hf_engine import HFRolloutEngine


@pytest.fixture()
def engine(tiny_policy):
    model, tokenizer = tiny_policy
    return HFRolloutEngine(
        copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, batch_size=4
    )


def _requests(tokenizer, n=3):
    return [
        GenerationRequest(tuple(encode_prompt(tokenizer, [{"role": "user", "content": q}])), n=n)
        for q in ("3+5", "1-2+3-4", "7")
    ]


def test_it_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine)


def test_n_samples_per_request_in_order_and_reproducible(engine, tiny_policy):
    _, tokenizer = tiny_policy
    params = SamplingParams(max_new_tokens=12)
    first = engine.generate(_requests(tokenizer), params, seed=11)
    assert [len(group) for group in first] == [3, 3, 3]
    assert first == engine.generate(_requests(tokenizer), params, seed=11)
    assert first != engine.generate(_requests(tokenizer), params, seed=12)


def test_logprobs_equal_a_training_forward(engine, tiny_policy):
    # The trainer recomputes behaviour log-probs; they must agree with the engine's (stack-notes).
    model, tokenizer = tiny_policy
    params = SamplingParams(temperature=0.7, max_new_tokens=10)
    requests = _requests(tokenizer, n=2)
    for request, group in zip(requests, engine.generate(requests, params, seed=3), strict=True):
        for completion in group:
            ids = torch.tensor([list(request.prompt_ids) + list(completion.token_ids)])
            with torch.no_grad():
                logits = engine.model(ids).logits[0, len(request.prompt_ids) - 1 : -1] / params.temperature
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
            assert torch.allclose(expected, torch.tensor(completion.logprobs), atol=1e-5)


def test_finish_reasons_and_per_request_limits(tiny_policy):
    model, tokenizer = tiny_policy
    # A model biased to say EOS at once stops; the same model with EOS forbidden runs to the limit.
    eager = copy.deepcopy(model)
    engine = HFRolloutEngine(eager, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    prompt = tuple(encode_prompt(tokenizer, [{"role": "user", "content": "1+1"}]))
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = 50.0
    handle = eager.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        [[stopped]] = engine.generate([GenerationRequest(prompt)], SamplingParams(max_new_tokens=8), seed=0)
    finally:
        handle.remove()
    assert stopped.finish_reason == "stop" and stopped.token_ids == (tokenizer.eos_token_id,)

    bias[tokenizer.eos_token_id] = -1e4
    handle = eager.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        short, long = engine.generate(
            [GenerationRequest(prompt, max_new_tokens=3), GenerationRequest(prompt, max_new_tokens=6)],
            SamplingParams(max_new_tokens=100),
            seed=0,
        )
    finally:
        handle.remove()
    assert (len(short[0].token_ids), short[0].finish_reason) == (3, "length")
    assert (len(long[0].token_ids), long[0].finish_reason) == (6, "length")


def test_continuation_from_a_prefix_returns_only_new_tokens(engine, tiny_policy):
    _, tokenizer = tiny_policy
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": "3+5-7"}])
    prefix = tokenizer.encode("8-7\n\n", add_special_tokens=False)
    [[continuation]] = engine.generate(
        [GenerationRequest(tuple(prompt + prefix), n=1)], SamplingParams(max_new_tokens=5), seed=0
    )
    assert 1 <= len(continuation.token_ids) <= 5


def test_update_weights_changes_what_is_sampled(engine, tiny_policy):
    model, tokenizer = tiny_policy
    params = SamplingParams(max_new_tokens=8)
    before = engine.generate(_requests(tokenizer), params, seed=5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    engine.update_weights(other.state_dict())
    after = engine.generate(_requests(tokenizer), params, seed=5)
    assert after != before
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
