"""Sequences that share prefixes, merged into one token tree (a trie) laid out depth-first.

A question's training paths share its prompt, and every continuation repeats the prefix of the
response it branched from (spec §10: each root-to-leaf path is a training sequence). A token's
log-prob under any model depends only on the tokens before it, so two sequences that agree up to
and including a token compute the same value there: one trie node per distinct prefix holds it
once, whichever sequences pass through it (``attnrl/training/sequences.tree_packed`` lays the nodes
out for one forward).

Nodes are numbered in depth-first preorder (children in the order they were first seen), so the
subtree of node ``j`` is the range ``j .. end[j] - 1`` and "``j`` is an ancestor of ``i`` or ``i``
itself" is ``j <= i < end[j]``: the attention mask under which every token sees exactly its own
sequence's prefix, stored in O(nodes) (``ancestor_mask``, and the same rule as a FlexAttention
``mask_mod``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class PrefixTrie:
    """A growing trie of token sequences: ``add`` returns each token's node, ``added`` how many nodes it would add."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []  # -1 for the first token of a sequence
        self._children: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def added(self, tokens: Sequence[int]) -> int:
        """How many new nodes ``add(tokens)`` would create (its tokens after the longest shared prefix)."""
        node = -1
        for k, token in enumerate(tokens):
            node = self._children.get((node, token), -2)
            if node == -2:
                return len(tokens) - k
        return 0

    def add(self, tokens: Sequence[int]) -> list[int]:
        """Each token's node (in insertion numbering), creating the nodes not there yet."""
        path, node = [], -1
        for token in tokens:
            child = self._children.get((node, token))
            if child is None:
                child = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self._children[(node, token)] = child
            path.append(child)
            node = child
        return path


@dataclass(frozen=True)
class TreeLayout:
    """A trie's nodes in depth-first preorder.

    ``order[k]`` is the insertion number of the node at preorder position ``k``; ``position`` maps an
    insertion number to its preorder position. ``parent`` and ``end`` are in preorder positions.
    """

    tokens: Tensor  # [U] token ids, preorder
    depth: Tensor   # [U] 0 for a sequence's first token: the position id of a token in its own sequence
    parent: Tensor  # [U] preorder position of the parent, -1 for a root
    end: Tensor     # [U] one past the last preorder position of the node's subtree
    position: Tensor  # [U] insertion number -> preorder position


def preorder(trie: PrefixTrie) -> TreeLayout:
    """Depth-first preorder of ``trie`` (a forest: roots and children in insertion order)."""
    children: list[list[int]] = [[] for _ in trie.tokens]
    roots = []
    for node, parent in enumerate(trie.parents):
        (roots if parent < 0 else children[parent]).append(node)
    count = len(trie.tokens)
    position = [0] * count
    depth = [0] * count
    end = [0] * count
    order: list[int] = []
    # Iterative DFS: (node, depth, entered?) so deep trees (thousands of tokens) need no recursion.
    stack: list[tuple[int, int, bool]] = [(root, 0, False) for root in reversed(roots)]
    while stack:
        node, d, entered = stack.pop()
        if entered:
            end[position[node]] = len(order)
            continue
        position[node] = len(order)
        depth[len(order)] = d
        order.append(node)
        stack.append((node, d, True))
        stack.extend((child, d + 1, False) for child in reversed(children[node]))
    parent = [-1 if trie.parents[node] < 0 else position[trie.parents[node]] for node in order]
    return TreeLayout(
        tokens=torch.tensor([trie.tokens[node] for node in order], dtype=torch.long),
        depth=torch.tensor(depth, dtype=torch.long),
        parent=torch.tensor(parent, dtype=torch.long),
        end=torch.tensor(end, dtype=torch.long),
        position=torch.tensor(position, dtype=torch.long),
    )


def sees(query: Tensor, key: Tensor, end: Tensor) -> Tensor:
    """Whether the token at preorder position ``query`` attends to the one at ``key``: ``key`` is an
    ancestor of ``query`` or ``query`` itself (broadcasting; also a FlexAttention ``mask_mod`` body)."""
    return (key <= query) & (query < end[key])


def ancestor_mask(end: Tensor) -> Tensor:
    """[U, U] boolean: row ``i`` is True exactly at ``i``'s ancestors and ``i`` (dense: the reference the
    segment kernel and the block mask are tested against)."""
    index = torch.arange(end.shape[0], device=end.device)
    return sees(index[:, None], index[None, :], end)


# The attention implementations a tree-packed row can run on: SDPA and eager through the segment kernel
# (``tree_attention.TreeAttention``), FlexAttention with a block mask built from ``sees`` (``block_mask``).
# Varlen kernels (flash attention) and the FCI kernel cannot: the trainer lays those out per sequence.
TREE_KERNELS = frozenset({"sdpa", "eager", "flex_attention"})


def block_mask(end: Tensor):
    """FlexAttention's block-sparse form of the tree mask over one row: O(U) to store, and the blocks no
    token of a block sees (sibling subtrees: most of a tree) are skipped, not computed and masked."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, query, key):
        return sees(query, key, end)

    # Compiled on CUDA (as transformers builds its own block masks): uncompiled, the rule is evaluated over the
    # whole [U, U] grid at once. CPU FlexAttention has no backward, so there it only serves the tests.
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=end.shape[0], KV_LEN=end.shape[0], device=end.device,
                             _compile=end.is_cuda)
