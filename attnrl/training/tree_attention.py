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

On a CPU the segments run through one autograd node, ``_SegmentAttention``, on the fused kernel SDPA
itself picks there (``_scaled_dot_product_flash_attention_for_cpu``, which returns the log-sum-exp and
whose backward takes it). A segment's queries attend to its ancestors' keys (all of them) and to its own
keys (causally) in two calls, merged by their log-sum-exps, so no mask is built and no masked-out pair
is computed. The node keeps the row's keys and values for the backward and gathers each segment's
ancestors again there: through autograd every gathered copy would be kept, several times the row's
keys when continuations branch deep into long responses. Elsewhere (CUDA) the segments run through
``scaled_dot_product_attention`` under autograd, with a causal mask that puts the ancestors first.

The kernel is a transformers attention function (``AttentionInterface``) the model switches to for a
tree's forward (and its backward, where gradient checkpointing recomputes layers): ``TreeAttention``.
FlexAttention on a GPU takes the same rule as a block mask instead (``prefix_tree.block_mask``).
"""

from __future__ import annotations

import functools
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
        self._query_counts = [s.stop - s.start for s in self.segments]
        self._ancestors = [s.keys[:-count].to(device) for s, count in zip(self.segments, self._query_counts)]
        # Off the CPU: one gather for every segment's keys, then a split (the backward is one index_add and one
        # concatenation, where slicing per segment would allocate a zero gradient of the whole row for each).
        self._keys = torch.cat([s.keys for s in self.segments]).to(device)
        self._key_counts = [len(s.keys) for s in self.segments]
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
        if query.device.type == "cpu":
            out = _SegmentAttention.apply(query, key, value, self, scale)
        else:
            out = self._autograd_segments(query, key, value, scale)
        return out.transpose(1, 2).contiguous()  # [1, U, heads, dim], as transformers' kernels

    def _autograd_segments(self, query: Tensor, key: Tensor, value: Tensor, scale: float | None) -> Tensor:
        gqa = query.shape[1] != key.shape[1]
        keys = key.index_select(2, self._keys).split(self._key_counts, dim=2)
        values = value.index_select(2, self._keys).split(self._key_counts, dim=2)
        queries = query.split(self._query_counts, dim=2)
        out = [torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
               for q, k, v, mask in zip(queries, keys, values, self._masks, strict=True)]
        return torch.cat(out, dim=2)

    @functools.cached_property
    def _masks(self) -> list[Tensor]:
        """Per segment, query row r (of q) with a ancestor keys sees key j iff j <= a + r: causal, aligned bottom-right."""
        device = self._keys.device
        return [torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)
                for keys, queries in zip(self._key_counts, self._query_counts, strict=True)]

    def key_sets(self, key: Tensor, value: Tensor, k: int) -> list[tuple[Tensor | slice, Tensor, Tensor, bool]]:
        """Segment ``k``'s key sets as (where, keys, values, causal): its ancestors' (gathered; a root segment has
        none), then its own (a view, read causally)."""
        own = slice(self.segments[k].start, self.segments[k].stop)
        sets: list[tuple[Tensor | slice, Tensor, Tensor, bool]] = []
        if self._ancestors[k].numel():
            where = self._ancestors[k]
            sets.append((where, key.index_select(2, where), value.index_select(2, where), False))
        sets.append((own, key[:, :, own], value[:, :, own], True))
        return sets


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _heads(kv: Tensor, groups: int) -> Tensor:
    """Keys or values repeated for grouped-query attention (query head h reads key/value head h // groups)."""
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def _grouped(grad: Tensor, groups: int) -> Tensor:
    return grad if groups == 1 else grad.unflatten(1, (-1, groups)).sum(2)


class _SegmentAttention(torch.autograd.Function):
    """Every segment's attention in one autograd node (CPU): the forward keeps the row's queries, keys, values,
    outputs and log-sum-exps; the backward gathers each segment's ancestor keys again. Two key sets of one query
    merge exactly through their log-sum-exps, and the fused backward of each set, given the merged output and
    log-sum-exp, is that set's share of the gradient (how FlashAttention splits keys into blocks)."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor, plan: TreeAttention, scale: float | None) -> Tensor:
        groups = query.shape[1] // key.shape[1]
        outs, lses = [], []
        for k, q in enumerate(query.split(plan._query_counts, dim=2)):
            parts = [_FLASH(q, _heads(keys, groups), _heads(values, groups), 0.0, causal, scale=scale)
                     for _, keys, values, causal in plan.key_sets(key, value, k)]
            if len(parts) == 1:
                out, lse = parts[0]
            else:
                (first, first_lse), (second, second_lse) = parts
                lse = torch.logaddexp(first_lse, second_lse)
                out = (first * (first_lse - lse).exp()[..., None] + second * (second_lse - lse).exp()[..., None])
                out = out.to(query.dtype)
            outs.append(out)
            lses.append(lse)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        query, key, value, out, lse = ctx.saved_tensors
        plan, counts = ctx.plan, ctx.plan._query_counts
        groups = query.shape[1] // key.shape[1]
        grad_key, grad_value, grad_query = torch.zeros_like(key), torch.zeros_like(value), []
        segments = zip(query.split(counts, 2), grad.split(counts, 2), out.split(counts, 2), lse.split(counts, 2))
        for k, (q, g, o, m) in enumerate(segments):
            g, o, m = g.contiguous(), o.contiguous(), m.contiguous()
            dq = torch.zeros_like(q)
            for where, keys, values, causal in plan.key_sets(key, value, k):
                gq, gk, gv = _FLASH_BACKWARD(g, q, _heads(keys, groups), _heads(values, groups), o, m, 0.0, causal,
                                             scale=ctx.scale)
                dq += gq
                if isinstance(where, slice):
                    grad_key[:, :, where] += _grouped(gk, groups)
                    grad_value[:, :, where] += _grouped(gv, groups)
                else:
                    grad_key.index_add_(2, where, _grouped(gk, groups))
                    grad_value.index_add_(2, where, _grouped(gv, groups))
            grad_query.append(dq)
        return torch.cat(grad_query, dim=2), grad_key, grad_value, None, None


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
