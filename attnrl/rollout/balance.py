"""Splitting one generation call across engines by tokens, a question's requests together (spec §5.4).

verl's ``balance_gen_batch`` keeps the rows of one question on one GPU (they share the prompt and,
for continuations, most of a response prefix, so that engine's prefix cache serves them) and
assigns these groups greedily, largest first, to the least-loaded GPU. The load of a request is
its token budget: ``n × (prompt + new-token limit)``, the most it can cost. Balancing by request
count instead would give one engine all the long continuations of a hard question.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnrl.rollout.engine import GenerationRequest
from attnrl.utils.partition import balanced_partition


def token_load(request: GenerationRequest, max_new_tokens: int) -> int:
    """The most tokens ``request`` can occupy: its n samples of prompt plus new-token limit."""
    return request.n * (len(request.prompt_ids) + (request.max_new_tokens or max_new_tokens))


def assign_by_tokens(requests: Sequence[GenerationRequest], engines: int, max_new_tokens: int) -> list[list[int]]:
    """Request indices per engine (each list ascending): groups whole, balanced by their token loads
    (``balanced_partition``: largest first to the least-loaded engine, ties to the earlier group and the
    lower engine), so the split is a pure function of the requests and the engine count."""
    groups: dict[object, list[int]] = {}
    for index, request in enumerate(requests):
        key = ("group", request.group) if request.group is not None else ("request", index)
        groups.setdefault(key, []).append(index)
    members = list(groups.values())  # first-appearance order
    loads = [sum(token_load(requests[i], max_new_tokens) for i in group) for group in members]
    return [sorted(i for g in share for i in members[g]) for share in balanced_partition(loads, engines)]
