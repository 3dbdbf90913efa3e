"""Micro-batch layouts (left-padded, padding-free, tree-packed) and token-budget micro-batching."""

from __future__ import annotations

import pytest
import torch

from attnrl.training.chunked_head import ResponseScorer
from attnrl.training.micro_batches import token_budget_batches
from attnrl.training.prefix_tree import ancestor_mask
from attnrl.training.sequences import (
    left_padded,
    padding_free,
    response_mask,
    rows_from_flat,
    split_flat,
    tree_packed,
    tree_tokens,
)
from attnrl.training.tree_attention import TreeAttention, segments

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


# A question's tree: two responses to one prompt, continuations from the first after 2 and after 1 of its
# tokens, one that repeats a whole response, and another question.
TREE_PROMPTS = [(5, 6, 7), (5, 6, 7), (5, 6, 7, 8, 9), (5, 6, 7, 8), (5, 6, 7), (4, 6)]
TREE_RESPONSES = [(8, 9, 10, 11), (8, 12), (13, 14, 11), (15,), (8, 12), (8, 9, 10)]


def test_a_tree_holds_each_distinct_token_once_and_expands_to_every_sequence():
    batch = tree_packed(TREE_PROMPTS, TREE_RESPONSES)
    # 5 6 7 | 8 9 10 11 | 12 | 13 14 11 | 15 → 12 distinct under the first prompt, 5 under the second.
    assert batch.input_ids.shape == (1, 17) and tree_tokens(TREE_PROMPTS, TREE_RESPONSES) == 17
    assert batch.expanded(batch.targets).tolist() == [t for r in TREE_RESPONSES for t in r]
    assert len(batch.targets) == 4 + 1 + 3 + 1 + 3  # the repeated response and shared 8s counted once
    # Each target is predicted from its parent: exactly one child of that node (it sees the node, one deeper) holds it.
    sees = ancestor_mask(batch.tree_end)
    tokens, depth = batch.input_ids[0], batch.position_ids[0]
    for parent, target in zip(batch.logit_index.tolist(), batch.targets.tolist(), strict=True):
        children = [j for j in range(17) if sees[j, parent] and depth[j] == depth[parent] + 1 and tokens[j] == target]
        assert len(children) == 1


def test_segments_are_runs_of_only_children_reading_their_ancestors():
    batch = tree_packed(TREE_PROMPTS, TREE_RESPONSES)
    # Row: 5 6 7 8 | 9 | 10 11 | 13 14 11 | 12 | 15 || 4 6 8 9 10 (the second question: one chain). 8 has three
    # children (9, 12, 15) and 9 two (10, 13): each ends a segment.
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 13, 14, 11, 12, 15, 4, 6, 8, 9, 10]
    found = [(s.start, s.stop, s.keys.tolist()) for s in segments(batch.tree_parent)]
    assert found == [(0, 4, [0, 1, 2, 3]), (4, 5, [0, 1, 2, 3, 4]), (5, 7, [0, 1, 2, 3, 4, 5, 6]),
                     (7, 10, [0, 1, 2, 3, 4, 7, 8, 9]), (10, 11, [0, 1, 2, 3, 10]), (11, 12, [0, 1, 2, 3, 11]),
                     (12, 17, [12, 13, 14, 15, 16])]
    dense = ancestor_mask(batch.tree_end)
    for s in segments(batch.tree_parent):  # every query of a segment sees its ancestors' keys and its own causally
        for row in range(s.start, s.stop):
            assert dense[row].nonzero().flatten().tolist() == [k for k in s.keys.tolist() if k <= row]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_tree_packed_outputs_equal_each_sequence_alone(implementation):
    # A random Qwen2 with grouped-query attention (4 heads, 2 key/value heads), as the paper's model has.
    from tests.conftest import small_tiny_model

    model = small_tiny_model()[0]
    model.set_attn_implementation(implementation)
    scorer = ResponseScorer(model, 4)
    left = left_padded(TREE_PROMPTS, TREE_RESPONSES, 0)
    tree = tree_packed(TREE_PROMPTS, TREE_RESPONSES)
    with torch.no_grad():
        want = scorer(left.input_ids, left.attention_mask, left.position_ids, left.logit_index, left.targets,
                      temperature=0.7, with_entropy=True)
        with TreeAttention(model, tree.tree_parent):
            got = scorer(tree.input_ids, None, tree.position_ids, tree.logit_index, tree.targets, temperature=0.7,
                         with_entropy=True)
        # The dense mask computes the same: the segment kernel is that mask, without its [U x U] cost.
        dense = scorer(tree.input_ids, ancestor_mask(tree.tree_end)[None, None], tree.position_ids, tree.logit_index,
                       tree.targets, temperature=0.7, with_entropy=True)
    assert model.config._attn_implementation == implementation
    for values, masked, expected in zip(got, dense, want, strict=True):
        torch.testing.assert_close(tree.expanded(values), expected, atol=1e-5, rtol=0)
        if implementation == "sdpa":
            torch.testing.assert_close(tree.expanded(masked), expected, atol=1e-5, rtol=0)


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
