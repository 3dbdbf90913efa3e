"""The greedy longest-processing-time split every balance by tokens uses."""

from __future__ import annotations

import pytest

from attnrl.utils.partition import balanced_partition


def test_bins_are_balanced_keep_order_and_cover_every_item():
    lengths = [10, 1, 1, 1, 9, 2, 3]
    shards = balanced_partition(lengths, 2)
    assert sorted(i for shard in shards for i in shard) == list(range(len(lengths)))
    assert all(shard == sorted(shard) for shard in shards)
    loads = [sum(lengths[i] for i in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(lengths)  # greedy LPT: within one sequence
    assert loads == [14, 13]
    # Fewer items than bins: some bins get none.
    assert balanced_partition([4, 2], 3) == [[0], [1], []]
    with pytest.raises(ValueError, match="bins"):
        balanced_partition([1], 0)
