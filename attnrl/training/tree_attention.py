"""Exact causal attention over a prefix tree, without a [tokens × tokens] mask (tree-packed training).

A tree-packed row (``sequences.tree_packed``) holds every distinct prefix once, in depth-first order;
a token must see exactly its ancestors. A dense mask does that, but its attention costs O(U²) for U
tokens in the row, where per-path training costs Σ over paths of O(L²): with long responses, more
than not packing at all.

So the row is cut into **segments**, maximal runs of nodes in which every node is the previous one's
only child (a prompt, a response up to its first branch point, a continuation). A segment's ancestors
are whole segments, so its queries attend to the keys of its ancestor segments, all of them, and to
its own keys causally: one SDPA call per segment over gathered keys. Every query sees what it would
see in its own path, and each pair (query, visible key) is computed once: the work of per-path
attention without the repeats.

The kernel is a transformers attention function (``AttentionInterface``) the model switches to for a
tree's forward (and its backward, where gradient checkpointing recomputes layers): ``TreeAttention``.
FlexAttention on a GPU takes the same rule as a block mask instead (``prefix_tree.block_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnrl.model.attention_swap import AttentionSwap

NAME = "attnrl_tree_sdpa"  # keeps "sdpa" in the name: transformers runs its implementation checks on it
_OWNERS: dict[int, TreeAttention] = {}


@dataclass(frozen=True)
class Segment:
    start: int
    stop: int
    keys: Tensor  # positions its queries read: every ancestor segment's, then its own (stop - start last)


def segments(parent: Tensor) -> list[Segment]:
    """The segments of a depth-first row whose node ``i`` has parent ``parent[i]`` (-1 for a root)."""
    count = parent.shape[0]
    children = torch.bincount(parent[parent >= 0], minlength=count).tolist()
    parents = parent.tolist()
    starts = [i for i in range(count) if i == 0 or parents[i] != i - 1 or children[i - 1] != 1]
    bounds = [*starts, count]
    out: list[Segment] = []
    owner = [0] * count  # segment index of each node
    for k, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        owner[start:stop] = [k] * (stop - start)
        own = torch.arange(start, stop)
        above = parents[start]
        keys = own if above < 0 else torch.cat([out[owner[above]].keys, own])
        out.append(Segment(start, stop, keys))
    return out


class TreeAttention:
    """``with TreeAttention(model, parent):`` runs ``model``'s attention layers over a tree-packed row (one row,
    nodes in depth-first order, ``parent`` as in ``prefix_tree.preorder``) segment by segment."""

    def __init__(self, model: nn.Module, parent: Tensor) -> None:
        self.segments = segments(parent.cpu())
        device = parent.device
        # One gather for every segment's keys, then a split: the backward is one index_add and one concatenation,
        # where slicing per segment would allocate a zero gradient of the whole row for each.
        self._keys = torch.cat([s.keys for s in self.segments]).to(device)
        self._key_counts = [len(s.keys) for s in self.segments]
        self._query_counts = [s.stop - s.start for s in self.segments]
        # Query row r of a segment with a ancestor keys sees key k iff k <= a + r.
        self._masks = [(torch.arange(keys, device=device)[None, :]
                        <= torch.arange(keys - queries, keys, device=device)[:, None])
                       for keys, queries in zip(self._key_counts, self._query_counts, strict=True)]
        self._swap = AttentionSwap(model, _register(), _OWNERS, self)

    def __enter__(self) -> TreeAttention:
        self._swap.enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._swap.exit()

    def attend(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, kwargs: dict[str, Any]) -> Tensor:
        if query.shape[0] != 1:
            raise ValueError(f"a tree-packed batch is one row, got {query.shape[0]}")
        if kwargs.get("dropout", 0.0):
            raise ValueError("tree attention runs without attention dropout")
        scale = kwargs.get("scaling")
        gqa = query.shape[1] != key.shape[1]
        keys = key.index_select(2, self._keys).split(self._key_counts, dim=2)
        values = value.index_select(2, self._keys).split(self._key_counts, dim=2)
        queries = query.split(self._query_counts, dim=2)
        out = [torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
               for q, k, v, mask in zip(queries, keys, values, self._masks, strict=True)]
        return torch.cat(out, dim=2).transpose(1, 2).contiguous()  # [1, U, heads, dim], as transformers' kernels


def _register() -> str:
    from transformers import AttentionInterface, AttentionMaskInterface

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs):
        owner = _OWNERS.get(id(module))
        if owner is None:
            raise RuntimeError(f"{NAME} is the attention of a model inside TreeAttention; this one is not")
        return owner.attend(module, query, key, value, kwargs), None

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, lambda **kwargs: None)  # the segments are the mask
    return NAME
