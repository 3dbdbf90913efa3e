"""Splitting weighted items into balanced bins: the greedy longest-processing-time rule.

One rule for every split by tokens: generation requests over engines (``rollout/balance.py``, verl's
``balance_gen_batch``) and sequences over trainer ranks (``training/sharding.py``, spec §11). Heaviest
item first onto the lightest bin; ties go to the earlier item and the lower bin, so a split is a pure
function of the weights and the bin count. Each bin is then listed in the original order.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def balanced_partition(weights: Sequence[int], bins: int) -> list[list[int]]:
    """Item indices per bin, each ascending; every bin gets an item while there are at least as many as bins.
    The heaviest bin exceeds the lightest by at most the heaviest item."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    loads = [(0, b) for b in range(bins)]
    members: list[list[int]] = [[] for _ in range(bins)]
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, b = heapq.heappop(loads)
        members[b].append(index)
        # An empty bin goes first: a count of zero is the one imbalance a trainer rank's lockstep fillers pay for.
        heapq.heappush(loads, (load + weights[index], b))
    return [sorted(indices) for indices in members]
