from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from attnrl.tree import (
    Continuation,
    InitialResponse,
    QuestionTree,
    Segment,
    TrainingPath,
    build_question_tree,
    filter_zero_advantage_questions,
    valid_token_ratio,
)


def _response(length: int, reward: float, continuations=(), base: int = 100) -> InitialResponse:
    # Distinct token ids and log-probs per position make misplaced slices visible.
    return InitialResponse(
        token_ids=tuple(range(base, base + length)),
        logprobs=tuple(-0.01 * (i + 1) for i in range(length)),
        reward=reward,
        continuations=tuple(continuations),
    )


def _cont(offset: int, reward: float, length: int = 2, base: int = 900) -> Continuation:
    return Continuation(
        offset=offset,
        token_ids=tuple(range(base, base + length)),
        logprobs=tuple(-1.0 - 0.1 * i for i in range(length)),
        reward=reward,
    )


def _segments(path: TrainingPath) -> list[tuple[int, float]]:
    """Run-length view of a path's advantages: [(token count, advantage), ...]."""
    runs: list[tuple[int, float]] = []
    for a in path.advantages:
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0] + 1, a)
        else:
            runs.append((1, a))
    return runs


# --- spec §9.5 worked example --------------------------------------------------------------------


def _worked_example() -> QuestionTree:
    tree1 = _response(
        10,
        1.0,
        [_cont(3, 1.0, base=310), _cont(3, 0.0, base=320), _cont(6, 1.0, base=610), _cont(6, 1.0, base=620)],
    )
    tree2 = _response(4, 0.0, base=500)
    return build_question_tree("q", [tree1, tree2])


def test_worked_example_matches_spec_9_5():
    tree = _worked_example()
    assert tree.root_value == pytest.approx(0.667, abs=1e-3)
    assert tree.leaf_rewards == (1.0, 1.0, 0.0, 1.0, 1.0, 0.0)
    # Five training sequences in the spec's order: [A|B|C], [A|c31], [A|c32], [A|B|c61], [A|B|c62]; tree 2 excluded.
    assert len(tree.paths) == 5
    assert all(p.response_index == 0 for p in tree.paths)

    a, b, c = 0.119, 0.308, 0.333
    expected = [
        [(3, a), (3, b), (4, c)],
        [(3, a), (2, 0.533)],
        [(3, a), (2, -1.467)],
        [(3, a), (3, b), (2, 0.333)],
        [(3, a), (3, b), (2, 0.333)],
    ]
    for path, segments in zip(tree.paths, expected, strict=True):
        got = _segments(path)
        assert [n for n, _ in got] == [n for n, _ in segments]
        for (_, adv), (_, want) in zip(got, segments, strict=True):
            assert adv == pytest.approx(want, abs=1e-3)


def test_worked_example_exact_formulas():
    tree = _worked_example()
    root = 4 / 6
    want_a = 2 * (0.8 - root) / math.sqrt(5)
    want_b = ((1 - root) + (1 - 0.8)) / math.sqrt(3)
    original, c31, c32, c61, _ = tree.paths
    assert original.advantages[0] == pytest.approx(want_a, rel=1e-12)
    assert original.advantages[3] == pytest.approx(want_b, rel=1e-12)
    assert original.advantages[-1] == pytest.approx(1 - root, rel=1e-12)
    assert c31.advantages[-1] == pytest.approx((1 - root) + (1 - 0.8), rel=1e-12)
    assert c32.advantages[-1] == pytest.approx((0 - root) + (0 - 0.8), rel=1e-12)
    assert c61.advantages[-1] == pytest.approx(1 - root, rel=1e-12)


def test_worked_example_tokens_logprobs_and_flags():
    tree = _worked_example()
    original, c31, c32, c61, c62 = tree.paths
    response_tokens = tuple(range(100, 110))
    response_logprobs = tuple(-0.01 * (i + 1) for i in range(10))

    assert original.token_ids == response_tokens and original.logprobs == response_logprobs
    assert (original.original_tokens, original.ends_in_continuation, original.reward) == (10, False, 1.0)

    assert c31.token_ids == response_tokens[:3] + (310, 311)
    assert c31.logprobs == response_logprobs[:3] + (-1.0, -1.1)
    assert (c31.original_tokens, c31.ends_in_continuation, c31.reward) == (3, True, 1.0)
    assert (c32.token_ids[3:], c32.reward) == ((320, 321), 0.0)

    assert c61.token_ids == response_tokens[:6] + (610, 611)
    assert c61.logprobs == response_logprobs[:6] + (-1.0, -1.1)
    assert (c61.original_tokens, c62.original_tokens) == (6, 6)
    assert c62.token_ids[6:] == (620, 621)
    for path in tree.paths:
        assert len(path.token_ids) == len(path.logprobs) == len(path.advantages)
        assert path.question == "q"


# --- shapes: duplicate offsets, several offsets ---------------------------------------------------


def test_duplicate_offsets_cut_once_and_share_a_parent():
    # §6.3 fallback can repeat an offset: [3, 3] with two continuations each -> one cut, four siblings of B.
    conts = [_cont(3, 1.0, base=10), _cont(3, 0.0, base=20), _cont(3, 0.0, base=30), _cont(3, 1.0, base=40)]
    tree = build_question_tree("dup", [_response(8, 1.0, conts)])
    assert tree.root_value == pytest.approx(3 / 5)
    original, *mc = tree.paths
    assert len(mc) == 4
    # A = [0, 3) holds every leaf: V(A) = V(root), so its advantage is exactly zero.
    assert _segments(original) == [(3, 0.0), (5, pytest.approx(0.8))]
    assert [p.advantages[-1] for p in mc] == pytest.approx([0.8, -1.2, -1.2, 0.8])
    assert [p.token_ids[3] for p in mc] == [10, 20, 30, 40]  # input order kept within one offset
    assert all(p.advantages[:3] == (0.0, 0.0, 0.0) for p in mc)
    assert all(p.original_tokens == 3 for p in mc)


def test_several_offsets_given_out_of_order():
    conts = [
        _cont(5, 1.0, base=50),
        _cont(2, 0.0, base=20),
        _cont(8, 1.0, base=80),
        _cont(2, 1.0, base=25),
    ]
    tree = build_question_tree("multi", [_response(10, 0.0, conts)])
    root = Fraction(3, 5)
    v2, v3 = Fraction(2, 3), Fraction(1, 2)  # V([2,5)), V([5,8))
    s1 = 0.0  # [0,2) holds every leaf
    s2 = float(2 * (v2 - root)) / math.sqrt(3)
    s3 = float((v3 - root) + (v3 - v2)) / math.sqrt(2)
    s4 = float((0 - root) + (0 - v3))
    assert tree.root_value == pytest.approx(0.6)

    original, c2a, c2b, c5, c8 = tree.paths
    assert _segments(original) == [(2, s1), (3, pytest.approx(s2)), (3, pytest.approx(s3)), (2, pytest.approx(s4))]
    assert _segments(c2a) == [(2, s1), (2, pytest.approx(-1.2))]
    assert _segments(c2b) == [(2, s1), (2, pytest.approx(0.8))]
    assert _segments(c5) == [(2, s1), (3, pytest.approx(s2)), (2, pytest.approx(float((1 - root) + (1 - v2))))]
    assert _segments(c8) == [(2, s1), (3, pytest.approx(s2)), (3, pytest.approx(s3)), (2, pytest.approx(0.9))]
    assert [p.original_tokens for p in tree.paths] == [10, 2, 2, 5, 8]
    assert [p.token_ids[p.original_tokens] for p in tree.paths[1:]] == [20, 25, 50, 80]
    assert c8.token_ids == tuple(range(100, 108)) + (80, 81)


def test_segments_list_every_node_with_its_value_and_advantage():
    # V(root) = 1/3 over the leaves {1 (response 0), 0 (its continuation at 2), 0 (response 1)}.
    tree = build_question_tree("q", [_response(4, 1.0, [_cont(2, 0.0, length=3)]), _response(3, 0.0)])
    # A(n) = ((V(n) - V(root)) + (V(n) - V(parent))) / sqrt(|L(n)|), the root as parent of a first segment.
    assert tree.segments == (
        Segment(0, False, 0, 2, None, 0.5, (1 / 3) / math.sqrt(2), 2, None),
        Segment(0, False, 2, 4, 0, 1.0, 7 / 6, 1, 1.0),
        Segment(0, True, 2, 5, 0, 0.0, -5 / 6, 1, 0.0),
        Segment(1, False, 0, 3, None, 0.0, -2 / 3, 1, 0.0),
    )
    # The segments' advantages are the ones the paths train on.
    original, continuation = tree.paths
    assert _segments(original) == [(2, tree.segments[0].advantage), (2, tree.segments[1].advantage)]
    assert _segments(continuation) == [(2, tree.segments[0].advantage), (3, tree.segments[2].advantage)]


def test_mathematically_zero_advantage_is_exactly_zero():
    # V(B) = 1/2, V(A) = 2/3, V(root) = 1/3: A(B) = (1/2 − 1/3) + (1/2 − 2/3) = 0,
    # which plain float arithmetic gives as 5.6e-17.
    expanded = _response(8, 1.0, [_cont(2, 1.0), _cont(2, 1.0), _cont(5, 0.0), _cont(5, 1.0), _cont(5, 0.0)])
    tree = build_question_tree("exact", [expanded] + [_response(3, 0.0)] * 6)
    assert tree.root_value == pytest.approx(1 / 3)
    original = tree.paths[0]
    assert original.advantages[2:5] == (0.0, 0.0, 0.0)


def test_unexpanded_responses_count_in_root_value_but_are_not_paths():
    tree = build_question_tree("flat", [_response(4, 1.0), _response(5, 0.0), _response(3, 1.0)])
    assert tree.paths == ()
    assert tree.leaf_rewards == (1.0, 0.0, 1.0)
    assert tree.root_value == pytest.approx(2 / 3)


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 10, 11, -1])
def test_offset_out_of_range_names_response_and_offset(offset):
    responses = [_response(4, 1.0), _response(10, 1.0, [_cont(offset, 0.0)])]
    with pytest.raises(ValueError, match=rf"response 1.*offset {offset}"):
        build_question_tree("q", responses)


def test_length_reward_and_empty_input_errors():
    with pytest.raises(ValueError, match="response 0: 3 token ids but 2 log-probs"):
        build_question_tree("q", [InitialResponse((1, 2, 3), (-0.1, -0.2), 1.0)])
    bad_cont = Continuation(offset=1, token_ids=(5, 6), logprobs=(-1.0,), reward=0.0)
    with pytest.raises(ValueError, match="continuation 0: 2 token ids but 1 log-probs"):
        build_question_tree("q", [_response(4, 1.0, [bad_cont])])
    with pytest.raises(ValueError, match="continuation has no tokens"):
        build_question_tree("q", [_response(4, 1.0, [Continuation(1, (), (), 1.0)])])
    with pytest.raises(ValueError, match="reward must be 0 or 1"):
        build_question_tree("q", [_response(4, 0.5)])
    with pytest.raises(ValueError, match="reward must be 0 or 1"):
        build_question_tree("q", [_response(4, 1.0, [_cont(2, -1.0)])])
    with pytest.raises(ValueError, match="no responses"):
        build_question_tree("q", [])


# --- zero-advantage filter and valid tokens (spec §7.6) -------------------------------------------


def test_filter_uses_kept_paths_only():
    mixed = _worked_example()
    # All kept paths are correct; the unexpanded wrong response does not rescue the question.
    uniform = build_question_tree("u", [_response(6, 1.0, [_cont(2, 1.0), _cont(4, 1.0)]), _response(3, 0.0)])
    all_wrong = build_question_tree("w", [_response(6, 0.0, [_cont(2, 0.0)])])
    nothing_expanded = build_question_tree("n", [_response(3, 1.0), _response(3, 0.0)])
    kept, dropped = filter_zero_advantage_questions([uniform, mixed, all_wrong, nothing_expanded])
    assert [t.question for t in kept] == ["q"]
    assert dropped == 3
    assert filter_zero_advantage_questions([]) == ([], 0)


def test_valid_token_ratio_counts_whole_sequences():
    def path(advantages):
        n = len(advantages)
        return TrainingPath("q", 0, tuple(range(n)), (0.0,) * n, tuple(advantages), 1.0, n, False)

    paths = [path([0.0, 0.0, 0.0]), path([0.0, 0.0, 0.0, 0.0, 0.5])]
    assert valid_token_ratio(paths) == pytest.approx(5 / 8)
    assert valid_token_ratio([]) == 0.0
    assert valid_token_ratio(_worked_example().paths) == 1.0


# --- property test on random trees ----------------------------------------------------------------


def _random_question(rng: random.Random) -> list[InitialResponse]:
    responses = []
    for index in range(rng.randint(1, 6)):
        length = rng.randint(1, 12)
        continuations = []
        if length >= 2 and rng.random() < 0.6:
            offsets = [rng.randint(1, length - 1) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.3:
                offsets.append(offsets[0])  # §6.3 duplicate
            for offset in offsets:
                for _ in range(rng.randint(1, 3)):
                    continuations.append(_cont(offset, float(rng.random() < 0.5), length=rng.randint(1, 4)))
        rng.shuffle(continuations)
        responses.append(_response(length, float(rng.random() < 0.5), continuations, base=1000 * index))
    return responses


def _reference_token_advantages(responses, index, continuation) -> list[float]:
    """Brute force, independent of the tree code: the leaves under the segment holding original token t are the
    original leaf plus every continuation branching after that segment's start (spec §9.1)."""
    rewards = [r.reward for r in responses] + [c.reward for r in responses for c in r.continuations]
    root = Fraction(sum(Fraction(x) for x in rewards)) / len(rewards)
    response = responses[index]
    cuts = sorted({c.offset for c in response.continuations})

    def value(leaves):
        return sum(Fraction(x) for x in leaves) / len(leaves), len(leaves)

    def leaves_from(start):
        return [response.reward] + [c.reward for c in response.continuations if c.offset > start]

    out = []
    end = continuation.offset if continuation else len(response.token_ids)
    for t in range(end):
        start = max([0] + [s for s in cuts if s <= t])
        v, n = value(leaves_from(start))
        parent_starts = [0] + [s for s in cuts if s < start]
        v_parent = root if start == 0 else value(leaves_from(max(parent_starts)))[0]
        out.append(float((v - root) + (v - v_parent)) / math.sqrt(n))
    if continuation:
        parent_start = max([0] + [s for s in cuts if s < continuation.offset])
        v_parent = value(leaves_from(parent_start))[0]
        leaf = Fraction(continuation.reward)
        out.extend([float((leaf - root) + (leaf - v_parent))] * len(continuation.token_ids))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_random_trees_against_brute_force_and_filter_guarantee(seed):
    rng = random.Random(seed)
    trees = []
    for q in range(8):
        responses = _random_question(rng)
        tree = build_question_tree(f"s{seed}q{q}", responses)
        trees.append(tree)

        leaves = len(responses) + sum(len(r.continuations) for r in responses)
        assert len(tree.leaf_rewards) == leaves
        assert tree.root_value == pytest.approx(sum(tree.leaf_rewards) / leaves)
        expanded = [i for i, r in enumerate(responses) if r.continuations]
        assert len(tree.paths) == sum(1 + len(responses[i].continuations) for i in expanded)

        by_response: dict[int, list[TrainingPath]] = {}
        for path in tree.paths:
            by_response.setdefault(path.response_index, []).append(path)
        for i, paths in by_response.items():
            response = responses[i]
            ordered = [None] + sorted(response.continuations, key=lambda c: c.offset)
            for path, continuation in zip(paths, ordered, strict=True):
                assert len(path.token_ids) == len(path.logprobs) == len(path.advantages)
                k = path.original_tokens
                assert path.token_ids[:k] == response.token_ids[:k]
                assert path.logprobs[:k] == response.logprobs[:k]
                if continuation is not None:
                    assert path.token_ids[k:] == continuation.token_ids
                    assert path.logprobs[k:] == continuation.logprobs
                want = _reference_token_advantages(responses, i, continuation)
                assert path.advantages == pytest.approx(want, abs=1e-12)

    kept, dropped = filter_zero_advantage_questions(trees)
    assert len(kept) + dropped == len(trees)
    for tree in kept:
        assert 0.0 < tree.root_value < 1.0
        for path in tree.paths:
            assert path.has_nonzero_advantage()
            assert path.advantages[-1] != 0.0  # the leaf segment itself (spec §7.6)
    if kept:
        assert valid_token_ratio([p for t in kept for p in t.paths]) == 1.0


def test_random_trees_many_seeds_filter_guarantee_only():
    # A broader, cheaper sweep of the §7.6 guarantee alone.
    rng = random.Random(12345)
    kept_total = 0
    for q in range(2000):
        tree = build_question_tree(str(q), _random_question(rng))
        kept, _ = filter_zero_advantage_questions([tree])
        for t in kept:
            kept_total += 1
            assert 0.0 < t.root_value < 1.0
            assert all(p.advantages[-1] != 0.0 for p in t.paths)
    assert kept_total > 200  # the sweep actually exercised kept questions
