"""The segment kernel (attnrl/training/tree_attention.py) against dense attention under the ancestor mask:
outputs and every input's gradient, with grouped-query attention, on both of its paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnrl.training.prefix_tree import ancestor_mask
from attnrl.training.sequences import tree_packed
from attnrl.training.tree_attention import TreeAttention, _SegmentAttention

# A prompt shared by three responses, two of which share a prefix and branch twice; a second question after it.
PROMPTS = [(5, 6, 7), (5, 6, 7), (5, 6, 7, 8, 9), (5, 6, 7, 8), (4, 6)]
RESPONSES = [(8, 9, 10, 11), (8, 12), (13, 14, 11), (15, 3, 3), (8, 9, 10)]


def _inputs(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, tokens, 8, generator=generator, dtype=torch.float64)  # 4 heads
    key, value = (torch.randn(1, 2, tokens, 8, generator=generator, dtype=torch.float64) for _ in range(2))  # 2 kv
    return query.requires_grad_(), key.requires_grad_(), value.requires_grad_()


@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_segment_attention_and_its_gradients_equal_dense_attention_under_the_ancestor_mask(path):
    tree = tree_packed(PROMPTS, RESPONSES)
    plan = TreeAttention(nn.Linear(1, 1), tree.tree_parent)  # the model only matters inside ``with``
    query, key, value = _inputs(tree.input_ids.shape[1])
    mask = ancestor_mask(tree.tree_end)
    want = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3, enable_gqa=True)
    want_grads = torch.autograd.grad((want * want.detach().cos()).sum(), (query, key, value))
    if path == "fused":  # the CPU's: one autograd node, the fused kernel's log-sum-exps
        got = _SegmentAttention.apply(query, key, value, plan, 0.3)
    else:  # every other device's: SDPA per segment under autograd
        got = plan._autograd_segments(query, key, value, 0.3)
    grads = torch.autograd.grad((got * want.detach().cos()).sum(), (query, key, value))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for name, grad, expected in zip(("query", "key", "value"), grads, want_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0, msg=name)


def test_each_segment_reads_its_ancestors_once_and_its_own_keys_as_a_view():
    tree = tree_packed(PROMPTS, RESPONSES)
    plan = TreeAttention(nn.Linear(1, 1), tree.tree_parent)
    key = value = torch.arange(tree.input_ids.shape[1], dtype=torch.float32).view(1, 1, -1, 1)
    for k, segment in enumerate(plan.segments):
        sets = plan.key_sets(key, value, k)
        read = [int(i) for _, keys, _, _ in sets for i in keys.flatten()]
        assert read == segment.keys.tolist()  # the ancestors, then the segment itself
        where, own, _, causal = sets[-1]
        assert causal and where == slice(segment.start, segment.stop) and own.data_ptr() == key[:, :, where].data_ptr()
        assert all(not causal for _, _, _, causal in sets[:-1])
