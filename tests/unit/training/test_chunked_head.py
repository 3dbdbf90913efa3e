"""Chunked LM head (memory-safe model math): log-probs, entropies and their gradients equal the
full-logit computation, on the tiny model and on a model with the R1-Distill vocabulary."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from attnrl.loss import entropy_from_logits, token_logprobs
from attnrl.training.chunked_head import ResponseScorer
from attnrl.training.sequences import left_padded, padding_free

R1_DISTILL_VOCAB = 151_936
PROMPTS = [(5, 6, 7), (5, 6), (7,), (9, 4, 4, 4, 5)]
RESPONSES = [(8, 9, 10, 11, 12), (9, 9), (8, 8, 8, 8, 8, 8, 8), (20,)]


def _full_logit_reference(model, temperature, entropy_weight):
    """What the trainer computed before: every position's logits, then the response positions (fp32)."""
    batch = left_padded(PROMPTS, RESPONSES, pad_token_id=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float() / temperature
    flat = logits.reshape(-1, logits.shape[-1])[batch.logit_index]
    logprobs, entropies = token_logprobs(flat, batch.targets), entropy_from_logits(flat)
    return logprobs, entropies, _gradients(model, logprobs, entropies, entropy_weight)


def _gradients(model, logprobs, entropies, entropy_weight):
    model.zero_grad(set_to_none=True)
    # Arbitrary per-token weights, so every position's gradient matters.
    weights = torch.linspace(-1.0, 1.0, logprobs.shape[0])
    ((weights * logprobs).sum() + entropy_weight * (weights.flip(0) * entropies).sum()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# An entropy is a sum over the whole vocabulary: with 151,936 terms near log(V) ≈ 11.9, both fp32 results
# lie ~1e-5 from the float64 value (measured: full 1.2e-5, chunked 1.0e-5), so entropies also get one
# part in a million of relative slack (about one fp32 ulp at 11.9).
ENTROPY_RTOL = 1e-6


def _assert_matches_full_logits(model, *, chunk_tokens, layout, temperature=0.7, entropy_weight=0.3):
    model = copy.deepcopy(model).float()
    want_lp, want_ent, want_grads = _full_logit_reference(model, temperature, entropy_weight)
    batch = left_padded(PROMPTS, RESPONSES, pad_token_id=0) if layout == "left" else padding_free(PROMPTS, RESPONSES)
    scorer = ResponseScorer(model, chunk_tokens)
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.logit_index, batch.targets)
    lp, ent = scorer(*args, temperature=temperature, with_entropy=True)
    grads = _gradients(model, lp, ent, entropy_weight)
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=ENTROPY_RTOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-5, rtol=0, msg=name)
    with torch.no_grad():  # the scoring pass's path: in place, no checkpoint
        lp_ng, ent_ng = scorer(*args, temperature=temperature, with_entropy=True)
        lp_only, none = scorer(*args, temperature=temperature, with_entropy=False)
    torch.testing.assert_close(lp_ng, want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_ng, want_ent, atol=1e-5, rtol=ENTROPY_RTOL)
    assert none is None and torch.equal(lp_only, lp_ng)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
@pytest.mark.parametrize("layout", ["left", "padding_free"])
def test_chunked_head_equals_full_logits_on_the_tiny_model(tiny_policy, chunk_tokens, layout):
    _assert_matches_full_logits(tiny_policy[0], chunk_tokens=chunk_tokens, layout=layout)


def test_chunked_head_equals_full_logits_with_the_r1_distill_vocabulary():
    # The real vocabulary and untied head of DeepSeek-R1-Distill-Qwen-1.5B on a small random body.
    config = Qwen2Config(vocab_size=R1_DISTILL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    _assert_matches_full_logits(model, chunk_tokens=5, layout="padding_free")


def test_heads_that_transform_their_logits_are_refused(tiny_policy):
    model = copy.deepcopy(tiny_policy[0])
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        ResponseScorer(model, 16)


@pytest.mark.parametrize("grad", [False, True])
def test_a_fixed_number_of_head_calls_adds_empty_calls_and_changes_nothing(grad):
    # Data-parallel ranks under ZeRO-3 gather the head in every call: they agree on a count (trainer lockstep).
    from attnrl.training.chunked_head import chunked_token_stats, head_calls

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    calls: list[int] = []
    head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    hidden, targets = torch.randn(7, 8, requires_grad=grad), torch.randint(0, 11, (7,))
    with torch.set_grad_enabled(grad):
        plain = chunked_token_stats(head, hidden, targets, temperature=0.7, chunk_tokens=3, with_entropy=True)
        assert calls == [3, 3, 1] and head_calls(7, 3) == 3
        calls.clear()
        padded = chunked_token_stats(head, hidden, targets, temperature=0.7, chunk_tokens=3, with_entropy=True, calls=5)
    assert calls == [3, 3, 1, 0, 0]
    assert torch.equal(plain[0], padded[0]) and torch.equal(plain[1], padded[1])
    if grad:  # the empty calls are part of the graph: their recompute gathers in the backward as well
        calls.clear()
        padded[0].sum().backward()
        assert calls == [0, 0, 1, 3, 3]  # recomputed in reverse order, the empty calls included
    with pytest.raises(ValueError, match="need 3 head calls"):
        chunked_token_stats(head, hidden, targets, temperature=0.7, chunk_tokens=3, with_entropy=False, calls=2)
