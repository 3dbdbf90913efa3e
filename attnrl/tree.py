"""Segment trees, Monte-Carlo values, process advantages and training paths (spec §9, §10.1, §7.6).

Per question, every initial response is the root of its own tree; a response expanded at split offsets
s1 < s2 < ... is cut into a chain of segments at those offsets, and the continuations sampled from offset s
hang under the segment that ends at s (spec §6.5, §9.1). All trees of a question share one synthetic
question root. Values are plain Monte-Carlo means of the 0/1 leaf rewards (spec §9.2) and every non-root
node n gets A(n) = (V(n) − V(root) + V(n) − V(parent)) / √|L(n)| (spec §9.3), which each token of the
segment inherits (spec §9.4).

This module is pure (stdlib only): it works on token ids and behaviour log-probs, not on tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import pairwise

_VALID_REWARDS = (0.0, 1.0)


@dataclass(frozen=True)
class Continuation:
    """One Monte-Carlo continuation sampled from ``response[:offset]`` (spec §6.4).

    ``offset`` is a token offset within the original response: the tokens before it are the shared
    prefix and the token at ``offset`` itself was re-sampled.
    """

    offset: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    reward: float


@dataclass(frozen=True)
class InitialResponse:
    """One of the G initial responses of a question with its behaviour log-probs and 0/1 reward.

    ``continuations`` empty means the response was not expanded; it still counts in V(root) (spec §9.2)
    but yields no training path (spec §10.1).
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    reward: float
    continuations: tuple[Continuation, ...] = ()


@dataclass(frozen=True)
class TrainingPath:
    """One root-to-leaf path of a question tree, ready for batch assembly (spec §10.1, §10.2).

    ``logprobs`` are behaviour log-probs: the stored values for tokens taken from the original response,
    the continuation's own values for its tokens (spec §10.2). ``advantages`` holds, per token, the A(n)
    of the segment the token belongs to (spec §9.4).
    """

    question: str
    response_index: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    advantages: tuple[float, ...]
    reward: float
    original_tokens: int
    ends_in_continuation: bool

    def has_nonzero_advantage(self) -> bool:
        """True when at least one token carries a non-zero advantage (the §7.6 "valid" sequence test)."""
        return any(a != 0.0 for a in self.advantages)


@dataclass(frozen=True)
class Segment:
    """One node of a question tree as the report draws it (spec §9.1–§9.3).

    ``start``/``end`` are token offsets along the node's path: a response segment covers
    ``response[start:end]``; a continuation branches at ``start`` (its first token re-samples the
    response's token there). ``parent`` indexes ``QuestionTree.segments`` (None: the question root).
    ``reward`` is set on leaves only.
    """

    response_index: int
    continuation: bool
    start: int
    end: int
    parent: int | None
    value: float
    advantage: float
    leaves: int
    reward: float | None


@dataclass(frozen=True)
class QuestionTree:
    """All trees of one question: V(root), the trainable paths and every leaf reward (spec §9, §10.1).

    ``segments`` lists every node below the question root, parents before children (empty for GRPO's
    flat groups)."""

    question: str
    root_value: float
    paths: tuple[TrainingPath, ...]
    leaf_rewards: tuple[float, ...]
    segments: tuple[Segment, ...] = ()


@dataclass(eq=False)
class _Node:
    """A segment of the question tree. Mutable only while the tree is being built."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    parent: _Node | None
    reward: float | None = None  # set on leaves only
    children: list[_Node] = field(default_factory=list)
    leaf_sum: Fraction = Fraction(0)
    leaf_count: int = 0

    def add_child(self, child: _Node) -> _Node:
        self.children.append(child)
        return child

    @property
    def value(self) -> Fraction:
        return self.leaf_sum / self.leaf_count


@dataclass(frozen=True)
class _Leaf:
    """A leaf with what its TrainingPath needs besides the advantages."""

    node: _Node
    response_index: int
    original_tokens: int
    ends_in_continuation: bool


def build_question_tree(question: str, responses: Sequence[InitialResponse]) -> QuestionTree:
    """Build the segment trees of one question and return V(root), the training paths and all leaf rewards.

    spec §9.1–§9.4, §10.1. Paths come per response in input order: the original response's path first,
    then its continuations by ascending offset (input order within one offset), as in the §9.5 example.
    Paths of length 1 (unexpanded responses) are excluded but their leaves count in V(root).

    Raises ValueError on an empty response list, a reward outside {0, 1}, mismatched token/log-prob
    lengths, an empty continuation, or an offset outside 0 < offset < len(response).
    """
    if not responses:
        raise ValueError(f"question {question!r}: no responses")
    root = _Node(token_ids=(), logprobs=(), parent=None)
    leaves: list[_Leaf] = []
    placed: list[_Placed] = []
    for index, response in enumerate(responses):
        _validate_response(question, index, response)
        leaves.extend(_attach_response(root, index, response, placed))

    for leaf in leaves:
        _backpropagate(leaf.node)
    advantages = _node_advantages(root)

    paths = tuple(_training_path(question, leaf, advantages) for leaf in leaves if leaf.node.parent is not root)
    return QuestionTree(
        question=question,
        root_value=float(root.value),
        paths=paths,
        leaf_rewards=tuple(leaf.node.reward for leaf in leaves),  # type: ignore[misc]
        segments=_segments(placed, advantages),
    )


def _validate_response(question: str, index: int, response: InitialResponse) -> None:
    where = f"question {question!r}, response {index}"
    _check_reward(where, response.reward)
    _check_lengths(where, response.token_ids, response.logprobs)
    length = len(response.token_ids)
    for c_index, continuation in enumerate(response.continuations):
        c_where = f"{where}, continuation {c_index}"
        if not 0 < continuation.offset < length:
            # offset 0 would duplicate the initial sample; offset == length would branch after the end.
            raise ValueError(
                f"{c_where}: offset {continuation.offset} must satisfy 0 < offset < {length} (response length)"
            )
        _check_reward(c_where, continuation.reward)
        _check_lengths(c_where, continuation.token_ids, continuation.logprobs)
        if not continuation.token_ids:
            # An empty leaf segment would leave its path without the leaf's (non-zero) advantage (spec §7.6).
            raise ValueError(f"{c_where}: continuation has no tokens")


def _check_reward(where: str, reward: float) -> None:
    if reward not in _VALID_REWARDS:
        raise ValueError(f"{where}: reward must be 0 or 1 (spec §9.2), got {reward!r}")


def _check_lengths(where: str, token_ids: Sequence[int], logprobs: Sequence[float]) -> None:
    if len(token_ids) != len(logprobs):
        raise ValueError(f"{where}: {len(token_ids)} token ids but {len(logprobs)} log-probs")


@dataclass(frozen=True)
class _Placed:
    """A node with where it lies along its path, for ``QuestionTree.segments``."""

    node: _Node
    response_index: int
    continuation: bool
    start: int


def _attach_response(root: _Node, index: int, response: InitialResponse, placed: list[_Placed]) -> list[_Leaf]:
    """Hang one response's segment chain and continuations under the question root (spec §9.1, §6.5).

    Returns its leaves: the original response's last segment first, then the continuations; every node
    it makes is appended to ``placed``, parents first.
    """
    tokens, logprobs = tuple(response.token_ids), tuple(response.logprobs)
    # Duplicate offsets (the §6.3 fallback can repeat one) cut only once; their continuations share a parent.
    cuts = sorted({c.offset for c in response.continuations})
    bounds = [0, *cuts, len(tokens)]

    segment_ending_at: dict[int, _Node] = {}
    parent = root
    for start, end in pairwise(bounds):
        parent = parent.add_child(_Node(token_ids=tokens[start:end], logprobs=logprobs[start:end], parent=parent))
        segment_ending_at[end] = parent
        placed.append(_Placed(parent, index, continuation=False, start=start))
    parent.reward = float(response.reward)
    leaves = [_Leaf(parent, index, original_tokens=len(tokens), ends_in_continuation=False)]

    for continuation in sorted(response.continuations, key=lambda c: c.offset):  # stable: input order kept
        branch_parent = segment_ending_at[continuation.offset]
        node = branch_parent.add_child(
            _Node(
                token_ids=tuple(continuation.token_ids),
                logprobs=tuple(continuation.logprobs),
                parent=branch_parent,
                reward=float(continuation.reward),
            )
        )
        leaves.append(_Leaf(node, index, original_tokens=continuation.offset, ends_in_continuation=True))
        placed.append(_Placed(node, index, continuation=True, start=continuation.offset))
    return leaves


def _segments(placed: Sequence[_Placed], advantages: dict[int, float]) -> tuple[Segment, ...]:
    position = {id(p.node): i for i, p in enumerate(placed)}
    return tuple(
        Segment(
            response_index=p.response_index,
            continuation=p.continuation,
            start=p.start,
            end=p.start + len(p.node.token_ids),
            parent=position.get(id(p.node.parent)),  # the root is not placed: None
            value=float(p.node.value),
            advantage=advantages[id(p.node)],
            leaves=p.node.leaf_count,
            reward=p.node.reward,
        )
        for p in placed
    )


def _backpropagate(leaf: _Node) -> None:
    """Add one leaf's reward and count to itself and every ancestor, root included (spec §9.2)."""
    assert leaf.reward is not None
    node: _Node | None = leaf
    while node is not None:
        node.leaf_sum += Fraction(leaf.reward)
        node.leaf_count += 1
        node = node.parent


def _node_advantages(root: _Node) -> dict[int, float]:
    """A(n) for every non-root node, keyed by id(node) (spec §9.3).

    Values are exact fractions so that a mathematically zero advantage is exactly 0.0: the zero-advantage
    filter and the valid-token metric (spec §7.6) test for equality with zero.
    """
    root_value = root.value
    advantages: dict[int, float] = {}
    stack = list(root.children)
    while stack:
        node = stack.pop()
        assert node.parent is not None
        numerator = (node.value - root_value) + (node.value - node.parent.value)  # global + local
        advantages[id(node)] = float(numerator) / math.sqrt(node.leaf_count)
        stack.extend(node.children)
    return advantages


def _training_path(question: str, leaf: _Leaf, advantages: dict[int, float]) -> TrainingPath:
    """Concatenate the segments from the question root down to ``leaf`` (spec §10.1)."""
    chain: list[_Node] = []
    node: _Node | None = leaf.node
    while node is not None and node.parent is not None:  # the root itself has no tokens
        chain.append(node)
        node = node.parent
    chain.reverse()

    token_ids: list[int] = []
    logprobs: list[float] = []
    token_advantages: list[float] = []
    for segment in chain:
        token_ids.extend(segment.token_ids)
        logprobs.extend(segment.logprobs)
        token_advantages.extend([advantages[id(segment)]] * len(segment.token_ids))
    return TrainingPath(
        question=question,
        response_index=leaf.response_index,
        token_ids=tuple(token_ids),
        logprobs=tuple(logprobs),
        advantages=tuple(token_advantages),
        reward=leaf.node.reward,  # type: ignore[arg-type]
        original_tokens=leaf.original_tokens,
        ends_in_continuation=leaf.ends_in_continuation,
    )


def filter_zero_advantage_questions(trees: Sequence[QuestionTree]) -> tuple[list[QuestionTree], int]:
    """Drop questions whose kept paths all end in the same reward (spec §7.6, ``filter_zero_std_adv``).

    Only the trainable paths are looked at, not the unexpanded responses. A question with no trainable
    path at all is dropped too: it has nothing to train on, and keeping it would break the guarantee
    that every kept question has 0 < V(root) < 1. Returns the kept trees (input order) and the number
    dropped.
    """
    kept = [tree for tree in trees if len({path.reward for path in tree.paths}) > 1]
    return kept, len(trees) - len(kept)


def valid_token_ratio(paths: Sequence[TrainingPath]) -> float:
    """Tokens of paths with any non-zero advantage over all tokens (spec §7.6 "valid token" metric).

    A whole sequence counts as valid as soon as one of its tokens has a non-zero advantage; it is not a
    per-token count. Returns 0.0 when there are no tokens.
    """
    total = sum(len(path.token_ids) for path in paths)
    if total == 0:
        return 0.0
    valid = sum(len(path.token_ids) for path in paths if path.has_nonzero_advantage())
    return valid / total
