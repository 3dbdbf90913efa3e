"""Laying prompt ⧺ response sequences out as model inputs, and per-token results back (spec §5.1, §11).

Three layouts, one result format:

* **left-padded** rows (``left_padded``): rows share the width of the longest, and every response
  ends at the last column. This is the layout the rollout engine generates with, so recomputed
  log-probs match the engine's (stack-notes.md).
* **padding-free** (``padding_free``): all sequences concatenated into one row, with position ids
  that restart at 0 for each sequence. transformers detects the restarts (``masking_utils``:
  packed-sequence detection when no attention mask is given) and keeps sequences apart: varlen
  kernels (flash attention) split the row, SDPA and eager get a block-diagonal mask. No compute is
  spent on padding (verl's ``use_remove_padding``, spec §5.1).
* **tree-packed** (``tree_packed``): the sequences merged into a prefix tree
  (``attnrl/training/prefix_tree.py``), every distinct prefix token once, in one row in depth-first
  order; position ids are depths, and ``tree_parent`` / ``tree_end`` define the attention under
  which a token sees exactly its ancestors (``attnrl/training/tree_attention.py``). A question's
  paths share the prompt and each continuation the prefix it branched from, so those tokens go
  through the model once instead of once per path (``train.tree_packing``).

Either way ``ModelBatch.logit_index`` names, in sequence order, the flat positions (row × width +
column) whose hidden states predict the response tokens, so only those reach the LM head, and
per-token results come back as one flat ``[N]`` tensor, N = total response tokens. Tree-packed,
the head sees each distinct predicted token once, and ``expand`` maps the N response tokens onto
those values (``expanded``), so a shared token's gradient is the sum of its sequences' terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnrl.training.prefix_tree import PrefixTrie, preorder


@dataclass(frozen=True)
class Span:
    """Where one sequence's tokens sit in the batch: row, first column, length (what FCI reads)."""

    row: int
    start: int
    length: int


@dataclass(frozen=True)
class ModelBatch:
    input_ids: Tensor              # [rows, width]
    attention_mask: Tensor | None  # [rows, width] for left padding; None when padding-free or tree-packed
    position_ids: Tensor | None    # [1, width] restarting per sequence (padding-free) or depths (tree); else None
    logit_index: Tensor            # [M] flat positions whose hidden states predict the (distinct) response tokens
    targets: Tensor                # [M] those tokens; M = N but in a tree, sequence after sequence
    response_lengths: tuple[int, ...]
    spans: tuple[Span, ...]        # empty when tree-packed: a sequence is not contiguous there
    tree_end: Tensor | None = None     # [width] tree-packed: one past each node's subtree (prefix_tree.sees)
    tree_parent: Tensor | None = None  # [width] tree-packed: each node's parent, -1 for a root
    expand: Tensor | None = None       # [N] tree-packed: each response token's entry among the M values

    @property
    def padding_free(self) -> bool:
        return self.position_ids is not None

    @property
    def tree(self) -> bool:
        return self.tree_end is not None

    def expanded(self, values: Tensor) -> Tensor:
        """Per-token ``values`` over the M predicted tokens as the N response tokens, sequence after sequence."""
        return values if self.expand is None else values.index_select(0, self.expand)

    def to(self, device: torch.device) -> ModelBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return ModelBatch(self.input_ids.to(device), move(self.attention_mask), move(self.position_ids),
                          self.logit_index.to(device), self.targets.to(device), self.response_lengths, self.spans,
                          move(self.tree_end), move(self.tree_parent), move(self.expand))


def _check(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> None:
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("a batch needs equally many (>0) prompts and responses")
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the first response token is predicted from it)")


def left_padded(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int) -> ModelBatch:
    """Left-pad ``prompt ⧺ response`` rows to the longest one."""
    _check(prompts, responses)
    rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    index, spans = [], []
    for i, (row, response) in enumerate(zip(rows, responses, strict=True)):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
        # Response token t sits at column width − R + t; the hidden state one column earlier predicts it.
        first = i * width + width - len(response) - 1
        index.append(torch.arange(first, first + len(response)))
        spans.append(Span(i, width - len(row), len(row)))
    return ModelBatch(input_ids, attention_mask, None, torch.cat(index), _targets(responses),
                      tuple(len(r) for r in responses), tuple(spans))


def padding_free(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> ModelBatch:
    """All ``prompt ⧺ response`` sequences in one row, position ids restarting at each sequence."""
    _check(prompts, responses)
    ids, positions, index, spans = [], [], [], []
    start = 0
    for prompt, response in zip(prompts, responses, strict=True):
        length = len(prompt) + len(response)
        ids.extend(prompt)
        ids.extend(response)
        positions.append(torch.arange(length))
        first = start + len(prompt) - 1
        index.append(torch.arange(first, first + len(response)))
        spans.append(Span(0, start, length))
        start += length
    return ModelBatch(torch.tensor([ids]), None, torch.cat(positions)[None], torch.cat(index), _targets(responses),
                      tuple(len(r) for r in responses), tuple(spans))


def tree_packed(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> ModelBatch:
    """The ``prompt ⧺ response`` sequences merged into one prefix tree, one row in depth-first order.

    Every distinct predicted token (a node that is a response token of some sequence) reaches the
    head once, predicted from its parent's hidden state; ``expand`` lists, for each sequence's
    response tokens in order, that token's entry among them.
    """
    _check(prompts, responses)
    trie = PrefixTrie()
    paths = [trie.add([*prompt, *response]) for prompt, response in zip(prompts, responses, strict=True)]
    layout = preorder(trie)
    position = layout.position.tolist()  # read per token below: plain ints, not tensor indexing
    responses_at = [[position[node] for node in path[len(prompt):]] for path, prompt in zip(paths, prompts, strict=True)]
    # Predicted nodes, in preorder, and each one's entry.
    predicted = sorted({node for nodes in responses_at for node in nodes})
    entry = {node: k for k, node in enumerate(predicted)}
    expand = [entry[node] for nodes in responses_at for node in nodes]
    nodes = torch.tensor(predicted, dtype=torch.long)
    return ModelBatch(layout.tokens[None], None, layout.depth[None], layout.parent[nodes], layout.tokens[nodes],
                      tuple(len(r) for r in responses), (), layout.end, layout.parent,
                      torch.tensor(expand, dtype=torch.long))


def tree_tokens(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> int:
    """Distinct tokens (the row's width) of ``tree_packed(prompts, responses)``."""
    trie = PrefixTrie()
    for prompt, response in zip(prompts, responses, strict=True):
        trie.add([*prompt, *response])
    return len(trie)


def _targets(responses: Sequence[Sequence[int]]) -> Tensor:
    return torch.tensor([token for response in responses for token in response], dtype=torch.long)


def layout_tokens(count: int, total: int, longest: int, *, packed: bool) -> int:
    """Token slots ``count`` sequences of ``total`` tokens (the longest ``longest``) occupy in a micro-batch:
    the whole row when padding-free, rows × longest when left-padded (what the token budget counts)."""
    return total if packed else count * longest


def split_flat(values: Tensor, lengths: Sequence[int]) -> list[tuple[float, ...]]:
    """Flat per-token ``values`` [N] back into one tuple per sequence."""
    return [tuple(chunk.tolist()) for chunk in torch.split(values.detach().cpu(), list(lengths))]


def response_mask(lengths: Sequence[int]) -> Tensor:
    """[B, Rmax] float mask, 1 on each row's last ``length`` entries (the loss layout)."""
    width = max(lengths)
    columns = torch.arange(width)
    return (columns[None, :] >= width - torch.tensor(list(lengths))[:, None]).float()


def rows_from_flat(values: Tensor, mask: Tensor) -> Tensor:
    """Flat per-token ``values`` [N] placed right-aligned in rows (``mask`` from ``response_mask``), with gradients."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask.bool(), values)


def right_aligned(values: Sequence[Sequence[float]], width: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-row values placed in the last ``len(row)`` columns (the loss layout)."""
    out = torch.zeros((len(values), width), dtype=dtype)
    for i, row in enumerate(values):
        if row:
            out[i, width - len(row):] = torch.tensor(list(row), dtype=dtype)
    return out
