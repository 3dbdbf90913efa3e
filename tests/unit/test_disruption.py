"""Disrupted attention (spec §5.3 disrupted_token_ranges): the step's weights zeroed after the softmax."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from attnrl.disruption import DisruptedAttention

WIDTH, STEP = 12, 5  # a 12-token prefix whose last 5 tokens are the disrupted step


def _ids(vocab: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(4, vocab, (2, WIDTH))


def test_the_control_is_the_models_own_attention(tiny_policy):
    model, _ = tiny_policy
    model = copy.deepcopy(model).eval()
    ids = _ids(model.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).logits
        with DisruptedAttention(model, 0):
            control = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # padding positions' outputs are nobody's
    assert torch.allclose(control[real], own[real], atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored on exit


def test_the_steps_weights_are_zeroed_after_the_softmax_without_renormalising():
    torch.manual_seed(1)
    batch, heads, kv_heads, keys, dim = 2, 4, 2, 9, 8
    query, key, value = torch.randn(batch, heads, 1, dim), torch.randn(batch, kv_heads, keys, dim), \
        torch.randn(batch, kv_heads, keys, dim)
    block = DisruptedAttention(torch.nn.Linear(1, 1), 3)
    block.width = 7  # the prompt: keys 0-6, the step its keys 4-6; keys 7-8 were generated since
    out = block._attend(query, key, value, None, None)
    # Independently: attention over the kept keys (renormalised by SDPA), times the mass they keep.
    key, value = key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1)
    kept = torch.tensor([1, 1, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    scores = (query @ key.transpose(2, 3)) * dim**-0.5
    mass = torch.exp(torch.logsumexp(scores[..., kept], -1) - torch.logsumexp(scores, -1))
    expected = F.scaled_dot_product_attention(query, key[:, :, kept], value[:, :, kept]) * mass[..., None]
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)


def test_generation_keeps_the_step_disrupted_at_every_decode_step(tiny_policy):
    model, tokenizer = tiny_policy
    model = copy.deepcopy(model).eval()
    ids = _ids(model.config.vocab_size)

    def generated(length):
        with torch.no_grad(), DisruptedAttention(model, length):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=None)
        return out.sequences, torch.stack(out.logits, dim=1)

    sequences, logits = generated(STEP)
    # Token by token through the KV cache, as one cached forward over all generated tokens: the prompt's
    # forward fixed the columns, and every later query still sees them zeroed.
    with torch.no_grad(), DisruptedAttention(model, STEP):
        prompt = model(input_ids=ids, use_cache=True)
        rest = model(input_ids=sequences[:, WIDTH:-1], cache=prompt.past_key_values, use_cache=True).logits
    assert torch.allclose(logits[:, 0], prompt.logits[:, -1], atol=1e-5)
    assert torch.allclose(logits[:, 1:], rest, atol=1e-5)
    _, control = generated(0)
    assert not torch.allclose(logits[:, 0], control[:, 0], atol=1e-3)


def test_a_negative_length_is_refused(tiny_policy):
    with pytest.raises(ValueError, match="length"):
        DisruptedAttention(tiny_policy[0], -1)
