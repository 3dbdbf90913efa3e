"""Micro-batch layouts (left-padded, padding-free) and token-budget micro-batching."""

from __future__ import annotations

import pytest
import torch

from attnrl.training.chunked_head import ResponseScorer
from attnrl.training.micro_batches import token_budget_batches
from attnrl.training.sequences import left_padded, padding_free, response_mask, rows_from_flat, split_flat

PROMPTS = [(5, 6, 7), (5, 6), (7,)]
RESPONSES = [(8, 9, 10, 11), (9, 9), (8, 8, 8, 8, 8, 8)]


@pytest.mark.parametrize("layout", ["left", "padding_free"])
def test_logit_index_points_one_before_each_response_token(layout):
    batch = left_padded(PROMPTS, RESPONSES, pad_token_id=0) if layout == "left" else padding_free(PROMPTS, RESPONSES)
    flat = batch.input_ids.reshape(-1)
    assert torch.equal(flat[batch.logit_index + 1], batch.targets)
    assert batch.targets.tolist() == [t for r in RESPONSES for t in r]
    for span, prompt, response in zip(batch.spans, PROMPTS, RESPONSES):
        row = batch.input_ids[span.row, span.start:span.start + span.length]
        assert row.tolist() == list(prompt) + list(response)
    if layout == "padding_free":
        assert batch.input_ids.shape == (1, 18) and batch.attention_mask is None
        assert batch.position_ids[0].tolist() == [*range(7), *range(4), *range(7)]
    else:
        assert batch.input_ids.shape == (3, 7) and batch.position_ids is None


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_padding_free_outputs_equal_left_padded_ones(tiny_policy, implementation):
    # transformers keeps packed sequences apart from restarting position ids (masking_utils); this is
    # what the padding-free layout relies on, so it is checked, not assumed.
    model = tiny_policy[0]
    original = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        scorer = ResponseScorer(model, 4)
        out = {}
        for name, batch in (("left", left_padded(PROMPTS, RESPONSES, 0)), ("packed", padding_free(PROMPTS, RESPONSES))):
            with torch.no_grad():
                out[name] = scorer(batch.input_ids, batch.attention_mask, batch.position_ids, batch.logit_index,
                                   batch.targets, temperature=1.0, with_entropy=True)
    finally:
        model.set_attn_implementation(original)
    for left, packed in zip(out["left"], out["packed"]):
        torch.testing.assert_close(packed, left, atol=1e-5, rtol=0)


def test_flat_values_round_trip_through_the_loss_layout():
    lengths = [4, 2, 6]
    values = torch.arange(12, dtype=torch.float32, requires_grad=True)
    mask = response_mask(lengths)
    rows = rows_from_flat(values, mask)
    assert rows[1].tolist() == [0, 0, 0, 0, 4, 5] and rows[0].tolist() == [0, 0, 0, 1, 2, 3]
    rows.sum().backward()
    assert values.grad.tolist() == [1.0] * 12  # gradients flow back to every token
    assert split_flat(values, lengths) == [(0.0, 1.0, 2.0, 3.0), (4.0, 5.0), tuple(float(v) for v in range(6, 12))]


def test_every_sequence_needs_a_prompt_and_a_response():
    with pytest.raises(ValueError, match="response"):
        left_padded([(1,)], [()], 0)
    with pytest.raises(ValueError, match="prompt"):
        padding_free([()], [(1,)])


def test_token_budget_batches_are_consecutive_and_within_budget():
    lengths = [10, 10, 30, 5, 5, 5, 100, 1]
    # Left-padded: rows × longest. [10, 10] = 20; + 30 → 90 > 40, so 30 starts anew; [30, 5] = 60 > 40.
    assert token_budget_batches(lengths, 40, packed=False) == [range(0, 2), range(2, 3), range(3, 6), range(6, 7),
                                                                range(7, 8)]
    # Padding-free: the total. 10 + 10 = 20, + 30 = 50 > 40; 30 + 5 + 5 = 40; 5 + 100 > 40.
    assert token_budget_batches(lengths, 40, packed=True) == [range(0, 2), range(2, 5), range(5, 6), range(6, 7),
                                                               range(7, 8)]
    # A sequence over the budget forms its own micro-batch; a huge budget keeps everything together.
    assert token_budget_batches([100], 8, packed=True) == [range(0, 1)]
    assert token_budget_batches(lengths, 10**6, packed=False) == [range(0, 8)]
    with pytest.raises(ValueError, match="budget"):
        token_budget_batches(lengths, 0, packed=True)
