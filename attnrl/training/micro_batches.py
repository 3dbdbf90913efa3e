"""Token-budget micro-batches (spec §12: dynamic micro-batching, 36,864 tokens per GPU).

Consecutive sequences (the spec's no-shuffle order, §11) share a micro-batch until the tokens it
would occupy exceed the budget: rows × longest row when left-padded, the total when padding-free
(``sequences.layout_tokens``). A sequence longer than the budget on its own forms its own
micro-batch, so every sequence is processed. Counting tokens instead of sequences bounds the
activation memory of every forward, whatever the response lengths (verl's
``ppo_max_token_len_per_gpu`` / ``log_prob_max_token_len_per_gpu``).

Tree-packed (``train.tree_packing``), a micro-batch's tokens are its prefix tree's distinct tokens
(``tree_budget_batches``): a continuation adds only what it does not share with the sequences before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnrl.training.prefix_tree import PrefixTrie
from attnrl.training.sequences import layout_tokens


def token_budget_batches(total_lengths: Sequence[int], budget: int, *, packed: bool) -> list[range]:
    """Split sequence indices ``0..n-1`` into consecutive ranges within ``budget`` tokens each."""
    if budget < 1:
        raise ValueError(f"the token budget must be at least 1, got {budget}")
    if any(length < 1 for length in total_lengths):
        raise ValueError("every sequence needs at least one token")
    batches: list[range] = []
    start, total, longest = 0, 0, 0
    for i, length in enumerate(total_lengths):
        total, longest = total + length, max(longest, length)
        if i > start and layout_tokens(i + 1 - start, total, longest, packed=packed) > budget:
            batches.append(range(start, i))
            start, total, longest = i, length, length
    if start < len(total_lengths):
        batches.append(range(start, len(total_lengths)))
    return batches


def tree_budget_batches(sequences: Sequence[Sequence[int]], budget: int) -> list[range]:
    """Split sequence indices into consecutive ranges whose prefix tree holds at most ``budget`` distinct tokens."""
    if budget < 1:
        raise ValueError(f"the token budget must be at least 1, got {budget}")
    if any(len(tokens) < 1 for tokens in sequences):
        raise ValueError("every sequence needs at least one token")
    batches: list[range] = []
    start, trie = 0, PrefixTrie()
    for i, tokens in enumerate(sequences):
        if i > start and len(trie) + trie.added(tokens) > budget:
            batches.append(range(start, i))
            start, trie = i, PrefixTrie()
        trie.add(tokens)
    if start < len(sequences):
        batches.append(range(start, len(sequences)))
    return batches
