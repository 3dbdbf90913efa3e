"""The prefix tree behind tree-packed training: distinct prefixes once, depth-first, the ancestor mask."""

from __future__ import annotations

import pytest
import torch

from attnrl.training.micro_batches import tree_budget_batches
from attnrl.training.prefix_tree import PrefixTrie, ancestor_mask, block_mask, preorder

# Inserted in this order the nodes are not depth-first: C's q comes after B's w but belongs under y.
SEQUENCES = [(1, 2, 3), (1, 4), (1, 2, 5), (6, 2)]


def _trie(sequences=SEQUENCES) -> tuple[PrefixTrie, list[list[int]]]:
    trie = PrefixTrie()
    return trie, [trie.add(s) for s in sequences]


def test_each_distinct_prefix_is_one_node():
    trie, paths = _trie()
    assert len(trie) == 7  # 1, 2, 3, 4, 5 under 1; 6, 2 as a second root
    assert paths[2][:2] == paths[0][:2] and paths[1][0] == paths[0][0]
    assert paths[3][1] not in paths[0]  # the same token after another prefix is another node
    assert trie.added((1, 2, 3)) == 0 and trie.added((1, 2, 7, 8)) == 2 and trie.added((9,)) == 1


def test_preorder_keeps_every_subtree_contiguous():
    trie, paths = _trie()
    layout = preorder(trie)
    order = layout.position.argsort()
    assert layout.tokens.tolist() == [1, 2, 3, 5, 4, 6, 2]
    assert layout.depth.tolist() == [0, 1, 2, 2, 1, 0, 1]
    assert layout.parent.tolist() == [-1, 0, 1, 1, 0, -1, 5]
    assert layout.end.tolist() == [5, 4, 3, 4, 5, 7, 7]
    for path, tokens in zip(paths, SEQUENCES, strict=True):
        positions = layout.position[path]
        assert layout.tokens[positions].tolist() == list(tokens)
        assert layout.depth[positions].tolist() == list(range(len(tokens)))
    assert torch.equal(layout.position[order], torch.arange(len(trie)))


def test_a_token_sees_exactly_its_ancestors():
    trie, _ = _trie()
    layout = preorder(trie)
    mask = ancestor_mask(layout.end)
    for i in range(len(trie)):
        ancestors, node = set(), i
        while node >= 0:
            ancestors.add(node)
            node = int(layout.parent[node])
        assert {j for j in range(len(trie)) if mask[i, j]} == ancestors, i


def test_flex_attentions_block_mask_is_the_same_rule():
    end = preorder(_trie()[0]).end
    block = block_mask(end)
    dense = block.to_dense()  # [1, 1, query blocks, key blocks]: one block here, partly allowed
    assert dense.sum() == 1
    kv = torch.arange(len(end))
    rows = torch.stack([block.mask_mod(0, 0, torch.tensor(q), kv) for q in range(len(end))])
    assert torch.equal(rows, ancestor_mask(end))


def test_tree_budget_counts_distinct_tokens():
    sequences = [(1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 6, 7), (8, 9), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)]
    # 4 + 1 + 2 = 7 distinct; + 2 = 9 > 8 starts anew; 2 + 10 > 8; the long one alone.
    assert tree_budget_batches(sequences, 8) == [range(0, 3), range(3, 4), range(4, 5)]
    assert tree_budget_batches(sequences, 100) == [range(0, 5)]
    with pytest.raises(ValueError, match="budget"):
        tree_budget_batches(sequences, 0)
